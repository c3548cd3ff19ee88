// The trainer's output (docs/recipes.md): metrics.jsonl, one JSON object per line,
// appended; and progress on stderr, a bar redrawn in place when stderr is a
// terminal, plain lines every log_every steps when it is a file or a pipe
// (where carriage returns would fill logs with redraws).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

namespace mola::train::detail {

// A JSON number, or null for NaN and infinities (JSON has no spelling for them).
nlohmann::json json_number(double v);

// Appends lines to a metrics.jsonl; each line is flushed at once so a crash
// loses nothing that was logged. An empty path discards the lines (the ranks
// other than 0 of a distributed run, which write nothing).
class MetricsLog {
 public:
  explicit MetricsLog(std::string path);
  void write(const nlohmann::json& line) const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A null stream draws nothing (the ranks other than 0 of a distributed run).
class ProgressBar {
 public:
  // first_step: the steps already done (a resumed run), so the ETA counts
  // only this session's pace.
  ProgressBar(int64_t total_steps, int64_t first_step, int64_t log_every, std::FILE* stream = stderr);
  ~ProgressBar();
  // After optimizer step `step`. In a terminal the bar is redrawn every
  // step; otherwise a line is printed when step % log_every == 0 or at the last step.
  void update(int64_t step, double loss, double lr, double tokens_per_s);
  // A line of its own (an evaluation, a checkpoint), not overwritten by the bar.
  void note(const std::string& line);
  // Ends the bar's line (in a terminal).
  void finish();

 private:
  int64_t total_, first_, log_every_;
  std::FILE* stream_;
  bool tty_;
  bool open_line_ = false;  // a bar is drawn and its line not ended
  std::chrono::steady_clock::time_point start_;
};

// Progress of a pass over rows that may take a while (an evaluation, the
// expert-load pass): nothing for a pass shorter than `quiet_s`; then a line
// "label: done/total rows, elapsed<eta" every `every_s` seconds (redrawn in
// place on a terminal) and a last one when it ends. A null stream draws nothing.
class PassProgress {
 public:
  PassProgress(std::string label, int64_t total, std::FILE* stream = stderr, double quiet_s = 3.0,
               double every_s = 5.0);
  ~PassProgress();
  void advance(int64_t rows);  // `rows` more are done
  void finish();

 private:
  void draw(bool last);
  std::string label_;
  int64_t total_, done_ = 0;
  std::FILE* stream_;
  bool tty_, shown_ = false, finished_ = false;
  double quiet_s_, every_s_, last_draw_s_ = 0.0;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace mola::train::detail
