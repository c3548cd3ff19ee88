// metrics.jsonl and the progress bar (progress.h).
#include "train/progress.h"

#include <cmath>
#include <fstream>
#include <stdexcept>
#include <unistd.h>

namespace mola::train::detail {

namespace {

// "1:02:03" or "2:03".
std::string clock_text(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%lld:%02lld", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  return buf;
}

}  // namespace

nlohmann::json json_number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

MetricsLog::MetricsLog(std::string path) : path_(std::move(path)) {}

void MetricsLog::write(const nlohmann::json& line) const {
  if (path_.empty()) return;
  std::ofstream out(path_, std::ios::app);
  out << line.dump() << '\n';
  out.flush();
  if (!out) throw std::runtime_error("trainer: cannot append to " + path_ + "; is the disk full or read-only?");
}

ProgressBar::ProgressBar(int64_t total_steps, int64_t first_step, int64_t log_every, std::FILE* stream)
    : total_(total_steps),
      first_(first_step),
      log_every_(log_every),
      stream_(stream),
      tty_(stream != nullptr && ::isatty(::fileno(stream)) != 0),
      start_(std::chrono::steady_clock::now()) {}

ProgressBar::~ProgressBar() { finish(); }

void ProgressBar::update(int64_t step, double loss, double lr, double tokens_per_s) {
  if (!stream_) return;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int64_t done = step - first_;
  const double eta = done > 0 ? elapsed / static_cast<double>(done) * static_cast<double>(total_ - step) : NAN;
  char stats[160];
  std::snprintf(stats, sizeof stats, "loss %.4f | lr %.3e | %.0f tok/s | %s<%s", loss, lr, tokens_per_s,
                clock_text(elapsed).c_str(), clock_text(eta).c_str());
  if (tty_) {
    constexpr int kWidth = 24;
    const int filled = total_ > 0 ? static_cast<int>(kWidth * step / total_) : kWidth;
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(kWidth, '.');
    // \r then clear to the end of the line (ANSI EL), so a shorter line leaves no tail.
    std::fprintf(stream_, "\r\x1b[K[%s] %lld/%lld | %s", bar.c_str(), static_cast<long long>(step),
                 static_cast<long long>(total_), stats);
    open_line_ = true;
  } else if (step % log_every_ == 0 || step == total_) {
    std::fprintf(stream_, "step %lld/%lld | %s\n", static_cast<long long>(step), static_cast<long long>(total_),
                 stats);
  }
  std::fflush(stream_);
}

void ProgressBar::note(const std::string& line) {
  if (!stream_) return;
  if (open_line_) std::fprintf(stream_, "\r\x1b[K");
  std::fprintf(stream_, "%s\n", line.c_str());
  open_line_ = false;
  std::fflush(stream_);
}

void ProgressBar::finish() {
  if (!stream_) return;
  if (open_line_) std::fprintf(stream_, "\n");
  open_line_ = false;
  std::fflush(stream_);
}

PassProgress::PassProgress(std::string label, int64_t total, std::FILE* stream, double quiet_s, double every_s)
    : label_(std::move(label)),
      total_(total),
      stream_(stream),
      tty_(stream != nullptr && ::isatty(::fileno(stream)) != 0),
      quiet_s_(quiet_s),
      every_s_(every_s),
      start_(std::chrono::steady_clock::now()) {}

PassProgress::~PassProgress() { finish(); }

void PassProgress::advance(int64_t rows) {
  done_ += rows;
  if (!stream_) return;
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (t < quiet_s_ || (shown_ && t - last_draw_s_ < (tty_ ? 0.5 : every_s_))) return;
  last_draw_s_ = t;
  draw(false);
}

void PassProgress::finish() {
  if (finished_) return;
  finished_ = true;
  if (stream_ && shown_) draw(true);
}

void PassProgress::draw(bool last) {
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = done_ > 0 ? t / static_cast<double>(done_) * static_cast<double>(total_ - done_) : NAN;
  const std::string text = label_ + ": " + std::to_string(done_) + "/" + std::to_string(total_) + " rows, " +
                           clock_text(t) + (last ? "" : "<" + clock_text(eta));
  if (tty_) std::fprintf(stream_, "\r\x1b[K%s%s", text.c_str(), last ? "\n" : "");
  else std::fprintf(stream_, "%s\n", text.c_str());
  std::fflush(stream_);
  shown_ = true;
}

}  // namespace mola::train::detail
