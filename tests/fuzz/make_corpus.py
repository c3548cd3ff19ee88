"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/):
valid inputs of every form each parser reads, plus a few near-misses. Run
from anywhere; the files are committed, so this is needed only to change
them. Crashes found by fuzzing are added by hand as corpus/<target>/crash-*.
"""
import json
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def safetensors(header, data=b""):
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def seeds_safetensors():
    t = "fuzz_safetensors_header"
    put(t, "empty-header", safetensors({}))
    put(t, "one-f32", safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)))
    put(t, "two-with-metadata", safetensors({
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
        "b": {"dtype": "I64", "shape": [], "data_offsets": [6, 14]},
        "c": {"dtype": "BOOL", "shape": [0, 4], "data_offsets": [14, 14]}}, bytes(14)))
    put(t, "all-dtypes", safetensors({f"t{i}": {"dtype": d, "shape": [1], "data_offsets": [i * 8, i * 8 + s]}
                                      for i, (d, s) in enumerate([("F64", 8), ("F32", 4), ("F16", 2), ("I32", 4),
                                                                  ("I16", 2), ("I8", 1), ("U8", 1),
                                                                  ("F8_E4M3", 1), ("F8_E5M2", 1)])}, bytes(72)))
    put(t, "overlap", safetensors({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                   "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, bytes(6)))
    put(t, "truncated", safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)))
    put(t, "huge-length", struct.pack("<Q", 1 << 62) + b"{}")
    # The header of the bundled model, data cut off (its offsets then point past the end).
    real = (ROOT / "data/models/stories260K/model.safetensors").read_bytes()
    n = struct.unpack("<Q", real[:8])[0]
    put(t, "stories260K-header", real[:8 + n])


def seeds_config_json():
    t = "fuzz_config_json"
    # First byte: the layer count for resolve() (1 + byte % 40).
    for layers, cfg in [(4, {"method": "mola", "experts": "2468", "top_k": 2, "rank": 8}),
                        (8, {"method": "mola", "experts": [2, 4, 6, 8], "top_k": [1, 2, 2, 2], "rank": 4,
                             "targets": ["q_proj", "v_proj"], "compute": "grouped"}),
                        (5, {"method": "lora", "rank": 64, "alpha": 128, "dropout": 0.0}),
                        (32, {"experts": "10-2-2-2", "top_k": 2, "aux_loss_coef": 0}),
                        (3, {"experts": 2, "top_k": 3})]:
        put(t, f"adapter-{layers}-{cfg.get('experts', 'lora')}".replace(" ", ""), bytes([layers - 1]) + json.dumps(cfg).encode())
    for p in sorted((ROOT / "configs/models").glob("*.json")) + [ROOT / "data/models/stories260K/config.json"]:
        put(t, f"model-{p.parent.name}-{p.stem}", b"\x04" + p.read_bytes())


def seeds_recipe():
    t = "fuzz_recipe"
    for p in sorted((ROOT / "configs/recipes").glob("*/*.json"))[::7] + [ROOT / "configs/recipes/tiny/scienceqa-2468.json"]:
        put(t, f"{p.parent.name}-{p.stem}", p.read_bytes())
    tiny = (ROOT / "configs/recipes/tiny/scienceqa-2468.json").read_bytes()
    put(t, "tiny-with-overrides", tiny + b"\0train.lr=1e-4\nadapter.experts=8642\ndata.cutoff_len=64\neval.methods=[\"loglik\"]")
    put(t, "minimal", json.dumps({"model": {"config": "configs/models/tiny.json"}, "tokenizer": "t.model"}))


def seeds_preset():
    t = "fuzz_preset"
    for layers, spec in [(4, "2468"), (32, "triangle"), (5, "inverted"), (7, "10-2-2-2"), (28, "2, 4, 6, 8"),
                         (18, "Hourglass"), (3, "diamond"), (32, " 5555 "), (1, "8642"), (6, "1,1,1,1")]:
        put(t, f"{layers}-{spec.strip().replace(' ', '').replace(',', '_')}", bytes([layers - 1]) + spec.encode())


if __name__ == "__main__":
    seeds_safetensors()
    seeds_config_json()
    seeds_recipe()
    seeds_preset()
    for d in sorted(CORPUS.iterdir()):
        print(d.name, len(list(d.iterdir())))
