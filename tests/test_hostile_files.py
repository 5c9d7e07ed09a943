"""Hostile adapter files and uploads: a clear error, no code run, nothing written outside, bounded time and memory.

Every case runs in one subprocess (fresh peak-RSS accounting, its own TMPDIR) through the real entry points:
PeftModel.from_pretrained, PeftModel.load_adapter, LoraConfig.from_pretrained and the Space's AdapterEngine.add_zip.
Each parametrized test then checks one case's record. Already covered elsewhere and not repeated here: the Space's
basic zip refusals (test_space_engine, test_space_api), half-truncated weights, r="eight", r 8 vs 4 in the file and
PREFIX_TUNING/IA3 (test_core).
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import random
import re
import resource
import shutil
import stat
import struct
import sys
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from peft_trainer import LoraConfig, PeftModel, get_peft_model
from tests import processes
from tests.space_helpers import ROOT, make_zip, zip_adapter

from .conftest import tiny_llama

WEIGHTS, CONFIG, PICKLED = "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"
LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
MAX_RSS_GROWTH_MB = 200
UPLOAD_MB = 8  # the Space's MAX_UPLOAD_MB in the subprocess: zips up to 8 MB, 64 MB unpacked
OUTSIDE = f"peft-trainer-hostile-{uuid.uuid4().hex[:12]}"  # what traversal entries aim at: /tmp/<OUTSIDE>
LIB_CALLS = ("from_pretrained", "load_adapter")


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # weights, config, pickle, name, subfolder, zip
    build: Callable[[Path, Path], Path]  # (case folder holding a valid adapter copy, markers folder) -> input path
    message: str  # regex the error message must match
    calls: tuple[str, ...] = LIB_CALLS
    kwargs: dict = field(default_factory=dict)


# ---- builders ------------------------------------------------------------------------------------------------


def st_file(header: object, body: bytes = b"", length: int | None = None) -> bytes:
    """safetensors bytes: 8-byte little-endian header length, JSON header, data."""
    text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def weights(make: Callable[[bytes], bytes]) -> Callable[[Path, Path], Path]:
    def build(folder: Path, markers: Path) -> Path:
        file = folder / WEIGHTS
        file.write_bytes(make(file.read_bytes()))
        return folder

    return build


def sparse_weights(shape: list[int], nbytes: int, dtype: str = "F32") -> Callable[[Path, Path], Path]:
    """A well-formed file whose one tensor really is ``nbytes`` long, on disk as a sparse file (no blocks used)."""

    def build(folder: Path, markers: Path) -> Path:
        head = st_file({LORA_A: {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}})
        with open(folder / WEIGHTS, "wb") as f:
            f.write(head)
            f.truncate(len(head) + nbytes)
        return folder

    return build


def other_rank_weights(r: int) -> Callable[[Path, Path], Path]:
    """Tensors of rank ``r`` under a config that says r=4."""

    def build(folder: Path, markers: Path) -> Path:
        get_peft_model(tiny_llama(), LoraConfig(r=r, target_modules=["q_proj", "v_proj"])).save_pretrained(
            folder / "other"
        )
        shutil.move(folder / "other" / WEIGHTS, folder / WEIGHTS)
        return folder

    return build


def transposed(folder: Path, markers: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS)
    save_file({k: v.T.contiguous() for k, v in tensors.items()}, folder / WEIGHTS)
    return folder


def config(**changes: object) -> Callable[[Path, Path], Path]:
    def build(folder: Path, markers: Path) -> Path:
        data = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps({**data, **changes}))
        return folder

    return build


def config_bytes(data: bytes) -> Callable[[Path, Path], Path]:
    def build(folder: Path, markers: Path) -> Path:
        (folder / CONFIG).write_bytes(data)
        return folder

    return build


class RunsCode:
    """Unpickling this calls builtins.exec or os.system (``gadget``), either of which creates ``marker``."""

    def __init__(self, marker: Path, gadget: str) -> None:
        self.marker, self.gadget = marker, gadget

    def __reduce__(self):
        if self.gadget == "system":
            return os.system, (f"touch '{self.marker}'",)
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def payload(marker: Path, fmt: str, gadget: str = "exec") -> bytes:
    """A pickle that would create ``marker``: a raw pickle or torch.save's zip format."""
    obj = {LORA_A: RunsCode(marker, gadget)}
    if fmt == "raw":
        return pickle.dumps(obj, protocol=2)
    path = marker.with_name(marker.name + ".pt")
    torch.save(obj, path)
    data = path.read_bytes()
    path.unlink()
    return data


def pickled(fmt: str, gadget: str = "exec") -> Callable[[Path, Path], Path]:
    def build(folder: Path, markers: Path) -> Path:
        (folder / WEIGHTS).unlink()
        (folder / PICKLED).write_bytes(payload(markers / folder.name, fmt, gadget))
        return folder

    return build


def pickled_value(value: object) -> Callable[[Path, Path], Path]:
    def build(folder: Path, markers: Path) -> Path:
        (folder / WEIGHTS).unlink()
        if isinstance(value, bytes):
            (folder / PICKLED).write_bytes(value)
        else:
            torch.save(value, folder / PICKLED)
        return folder

    return build


def nested(folder: Path, markers: Path) -> Path:
    """``folder/`` holds an adapter, so do ``folder/sibling/`` and ``folder/root/inner/``: a subfolder escaping
    ``folder/root`` finds a loadable adapter, so only a refusal makes these cases pass."""
    for name in ("sibling", "root/inner"):
        shutil.copytree(folder, folder / name, ignore=shutil.ignore_patterns("sibling", "root"))
    return folder / "root"


def same(folder: Path, markers: Path) -> Path:
    return folder


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


def zipped(make: Callable[[dict[str, bytes], Path, Path], dict[str, bytes]]) -> Callable[[Path, Path], Path]:
    """A zip of the valid adapter's files as changed by ``make(files, folder, markers)``."""

    def build(folder: Path, markers: Path) -> Path:
        return make_zip(folder.with_suffix(".zip"), make(adapter_files(folder), folder, markers))

    return build


def special_entry(name: str, mode: int) -> Callable[[Path, Path], Path]:
    """The adapter's files plus one entry whose unix mode (file type) is ``mode``."""

    def build(folder: Path, markers: Path) -> Path:
        path = make_zip(folder.with_suffix(".zip"), adapter_files(folder))
        with zipfile.ZipFile(path, "a") as zf:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = mode << 16
            zf.writestr(info, b"x")
        return path

    return build


def patch_entry(path: Path, name: str, cd_offset: int, local_offset: int, value: bytes) -> None:
    """Overwrite one field of entry ``name`` in both its central-directory record and its local header."""
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo(name)
    cd = data.rfind(b"PK\x01\x02", 0, data.rfind(name.encode()))
    data[cd + cd_offset : cd + cd_offset + len(value)] = value
    data[info.header_offset + local_offset : info.header_offset + local_offset + len(value)] = value
    path.write_bytes(bytes(data))


def symlinked(name: str, target: str) -> Callable[[Path, Path], Path]:
    """The adapter's other files, with ``name`` a symbolic link to ``target``."""

    def build(folder: Path, markers: Path) -> Path:
        files = {k: v for k, v in adapter_files(folder).items() if k != name}
        return make_zip(folder.with_suffix(".zip"), files, {name: target})

    return build


def encrypted(folder: Path, markers: Path) -> Path:
    path = make_zip(folder.with_suffix(".zip"), adapter_files(folder))
    patch_entry(path, CONFIG, 8, 6, (1).to_bytes(2, "little"))  # general purpose flag bit 0: encrypted
    return path


def bomb(declared: int | None) -> Callable[[Path, Path], Path]:
    """256 MiB of zeros as the weights file (a ~250 KB zip); ``declared`` overrides the size its headers state."""

    def build(folder: Path, markers: Path) -> Path:
        path = folder.with_suffix(".zip")
        zeros = bytes(16 * 2**20)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(CONFIG, (folder / CONFIG).read_bytes())
            with zf.open(WEIGHTS, "w") as f:
                for _ in range(16):
                    f.write(zeros)
        assert path.stat().st_size < 2**20
        if declared is not None:
            patch_entry(path, WEIGHTS, 24, 22, declared.to_bytes(4, "little"))
        return path

    return build


def many_entries(folder: Path, markers: Path) -> Path:
    """40 entries of 2 MiB zeros each: 80 MiB in all, over the 64 MiB unpacked limit, in a ~100 KB zip."""
    pads = {f"pad{i}.bin": bytes(2 * 2**20) for i in range(40)}
    return make_zip(folder.with_suffix(".zip"), {**adapter_files(folder), **pads})


def truncated_zip(folder: Path, markers: Path) -> Path:
    path = zip_adapter(folder, folder.with_suffix(".zip"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def corrupt_zip(folder: Path, markers: Path) -> Path:
    path = zip_adapter(folder, folder.with_suffix(".zip"))
    info = zipfile.ZipFile(path).getinfo(CONFIG)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(CONFIG)
    data[start + 4 : start + 24] = bytes(b ^ 0x5A for b in data[start + 4 : start + 24])
    path.write_bytes(bytes(data))
    return path


def valid_zip(folder: Path, markers: Path) -> Path:
    return zip_adapter(folder, folder.with_suffix(".zip"))


# ---- the cases -----------------------------------------------------------------------------------------------

NOT_ST = "truncated or not a safetensors file"
MISFIT = "does not fit this base model"
ASKS = rf"{MISFIT}: its config .* asks for [\d,]+ LoRA parameters here but its weights file holds 1,792"
SUB = "must be a relative path inside"
CONFIG_CALLS = ("config", *LIB_CALLS)


def one_tensor(dtype: str, shape: list[int], offsets: list[int], body: int) -> Callable[[Path, Path], Path]:
    return weights(lambda d: st_file({LORA_A: {"dtype": dtype, "shape": shape, "data_offsets": offsets}}, bytes(body)))


def pickles_only(files: dict[str, bytes], folder: Path, markers: Path) -> dict[str, bytes]:
    """The config, a malicious adapter_model.bin and training_args.bin, no safetensors."""
    evil = {
        PICKLED: payload(markers / folder.name, "raw"),
        "training_args.bin": payload(markers / folder.name, "torch"),
    }
    return {CONFIG: files[CONFIG], **evil}


def zip_config(**changes: object) -> Callable[[Path, Path], Path]:
    return zipped(lambda f, d, m: {**f, CONFIG: json.dumps({**json.loads(f[CONFIG]), **changes}).encode()})


TWO_AT_ONCE = {LORA_A: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
               "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}  # fmt: skip
# (id, build, message): broken, lying or absurd safetensors
WEIGHT_CASES = [
    ("empty", weights(lambda d: b""), NOT_ST),
    ("3-bytes", weights(lambda d: b"\x10\x00\x00"), NOT_ST),
    ("header-cut", weights(lambda d: d[:40]), NOT_ST),
    ("one-byte-short", weights(lambda d: d[:-1]), NOT_ST),
    ("random-bytes", weights(lambda d: random.Random(0).randbytes(4096)), NOT_ST),
    ("length-then-garbage", weights(lambda d: struct.pack("<Q", 64) + b"\xff" * 64), NOT_ST),
    ("header-length-2^60", weights(lambda d: st_file({}, length=2**60)), NOT_ST),
    ("header-length-2^64-1", weights(lambda d: st_file({}, length=2**64 - 1)), NOT_ST),
    ("header-not-object", weights(lambda d: st_file([1, 2, 3])), NOT_ST),
    ("header-deep-nesting", weights(lambda d: st_file("[" * 100_000 + "]" * 100_000)), NOT_ST),
    ("10^12-elements-beyond-file", one_tensor("F32", [10**6, 10**6], [0, 4 * 10**12], 64), NOT_ST),
    ("10^12-elements-in-16-bytes", one_tensor("F32", [10**6, 10**6], [0, 16], 16), NOT_ST),
    ("negative-shape", one_tensor("F32", [-1, 64], [0, 16], 16), NOT_ST),
    ("unknown-dtype", one_tensor("F128", [1], [0, 16], 16), NOT_ST),
    ("overlapping-tensors", weights(lambda d: st_file(TWO_AT_ONCE, bytes(16))), NOT_ST),
    ("10^12-elements-sparse-1TB", sparse_weights([10**12], 10**12, "U8"), r"over the \d+-byte limit"),
    ("2^28-elements-sparse-1GiB", sparse_weights([2**22, 64], 2**30), r"has shape \(4194304, 64\) in the file but"),
    ("transposed", transposed, rf"{MISFIT}(?s:.*)shape \(64, 4\) in the file but \(4, 64\)"),
    ("rank-64-config-4", other_rank_weights(64), rf"{MISFIT}(?s:.*)\(64, 64\) in the file"),
]
# (id, build, message, calls): adapter_config.json not JSON, wrongly typed, of another PEFT type, with absurd r
CONFIG_CASES = [
    ("empty", config_bytes(b""), "not valid JSON", CONFIG_CALLS),
    ("invalid-utf8", config_bytes(b'{"r": "\xff\xfe"}'), "not valid JSON", CONFIG_CALLS),
    ("deep-nesting", config_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON", CONFIG_CALLS),
    ("list", config_bytes(b"[]"), "expected a JSON object, got list", CONFIG_CALLS),
    ("number", config_bytes(b"5"), "expected a JSON object, got int", CONFIG_CALLS),
    ("r-null", config(r=None), "r=None: the rank must be a positive integer", CONFIG_CALLS),
    ("r-list", config(r=[4]), r"r=\[4\]: the rank", CONFIG_CALLS),
    ("r-bool", config(r=True), "r=True: the rank", CONFIG_CALLS),
    ("target-number", config(target_modules=5), "target_modules=5: must be a list", CONFIG_CALLS),
    ("target-ints", config(target_modules=[1, 2]), r"target_modules=\[1, 2\]: must be", CONFIG_CALLS),
    ("target-bad-regex", config(target_modules="(q"), "'\\(q': not a valid regular expression", CONFIG_CALLS),
    ("exclude-number", config(exclude_modules=7), "exclude_modules=7: must be", CONFIG_CALLS),
    ("alpha-null", config(lora_alpha=None), "lora_alpha=None: must be a number", CONFIG_CALLS),
    ("alpha-string", config(lora_alpha="16"), "lora_alpha='16': must be a number", CONFIG_CALLS),
    ("dropout-string", config(lora_dropout="0.1"), "lora_dropout='0.1': must be", CONFIG_CALLS),
    ("modules-to-save-number", config(modules_to_save=5), "modules_to_save=5: must be", CONFIG_CALLS),
    ("layers-string", config(layers_to_transform="0"), "layers_to_transform='0': must be", CONFIG_CALLS),
    ("alpha-pattern-string", config(alpha_pattern={"q_proj": "x"}), "alphas must be numbers", CONFIG_CALLS),
    ("rank-pattern-bad-regex", config(rank_pattern={"(": 4}), r"rank_pattern=\{'\(': 4\}: must be", CONFIG_CALLS),
    ("rslora-string-false", config(use_rslora="false"), "use_rslora='false': must be true or false", CONFIG_CALLS),
    ("peft-type-unknown", config(peft_type="NOT_A_TYPE"), "peft_type='NOT_A_TYPE' is not supported", CONFIG_CALLS),
    ("peft-type-null", config(peft_type=None), "peft_type=None is not supported", CONFIG_CALLS),
    ("peft-type-number", config(peft_type=5), "peft_type=5 is not supported", CONFIG_CALLS),
    ("r-10^9", config(r=10**9), ASKS, LIB_CALLS),
    ("r-2^20", config(r=2**20), ASKS, LIB_CALLS),
    ("rank-pattern-10^9", config(rank_pattern={"v_proj": 10**9}), ASKS, LIB_CALLS),
    ("r-2-file-4", config(r=2), rf"{MISFIT}(?s:.*)\(4, 64\) in the file but \(2, 64\)", LIB_CALLS),
]
EXEC = r"refused by torch.load\(weights_only=True\).*nsupported global: GLOBAL (builtins\.)?exec\b"
# (id, build, message, allow_pickle): adapter_model.bin; none of the payloads may run
PICKLE_CASES = [
    ("raw-default", pickled("raw"), "pickle file, which can run code.*allow_pickle=True", False),
    ("torch-default", pickled("torch"), "pickle file, which can run code.*allow_pickle=True", False),
    ("raw-exec", pickled("raw"), EXEC, True),
    ("torch-exec", pickled("torch"), EXEC, True),
    ("raw-system", pickled("raw", "system"), r"weights_only=True\).*nsupported GLOBAL (posix|os)\.system", True),
    ("list-not-dict", pickled_value([1, 2]), "does not hold a mapping of tensor names", True),
    ("garbage", pickled_value(random.Random(1).randbytes(512)), r"refused by torch.load.*\(Unsupported operand", True),
]
# adapter names and subfolders that are paths ("ABSOLUTE": the sibling adapter's absolute path, known only later)
NAMES = ["../escape", "/tmp/abs", "..", "a/b", "a\\b", "", "__base__", "trailing\n", "a.b"]
SUBFOLDERS = ["..", "../sibling", "inner/../../sibling", "..\\sibling", "ABSOLUTE"]
# (id, build, message, adapter name): the Space's zip upload
ZIP_CASES = [
    ("dotdot-to-tmp", zipped(lambda f, d, m: {**f, "../" * 24 + f"tmp/{OUTSIDE}": b"x"}), "outside its folder", None),
    ("absolute-to-tmp", zipped(lambda f, d, m: {**f, f"/tmp/{OUTSIDE}": b"x"}), "outside its folder", None),
    ("drive-letter", zipped(lambda f, d, m: {**f, "C:/evil.txt": b"x"}), "outside its folder", None),
    ("symlink-weights", symlinked(WEIGHTS, "/etc/passwd"), "symbolic link", None),
    ("symlink-config", symlinked(CONFIG, "../" * 24 + "etc/passwd"), "symbolic link", None),
    ("fifo", special_entry("pipe", stat.S_IFIFO | 0o644), "not a regular file", None),
    ("char-device", special_entry("null", stat.S_IFCHR | 0o666), "not a regular file", None),
    ("encrypted", encrypted, "encrypted", None),
    ("bomb-256MiB", bomb(None), "unpacks to 256.0 MB, over the 64.0 MB limit", None),
    ("bomb-lying-size", bomb(1024), "corrupt|declared size", None),
    ("bomb-many-entries", many_entries, "unpacks to 80.0 MB", None),
    ("truncated", truncated_zip, "not a readable zip", None),
    ("corrupt-data", corrupt_zip, "corrupt", None),
    ("pickles-only", zipped(pickles_only), f"No {WEIGHTS} found", None),
    ("pickle-as-safetensors", zipped(lambda f, d, m: {**f, WEIGHTS: payload(m / d.name, "raw")}), NOT_ST, None),
    ("header-length-2^60", zipped(lambda f, d, m: {**f, WEIGHTS: st_file({}, length=2**60)}), NOT_ST, None),
    ("r-10^9", zip_config(r=10**9), ASKS, None),
    ("target-number", zip_config(target_modules=5), "target_modules=5: must be", None),
    ("name-dotdot", valid_zip, "Invalid adapter name", "../../evil"),
    ("name-absolute", valid_zip, "Invalid adapter name", f"/tmp/{OUTSIDE}"),
]
CASES = [
    *[Case(f"st-{i}", "weights", b, m) for i, b, m in WEIGHT_CASES],
    *[Case(f"cfg-{i}", "config", b, m, calls) for i, b, m, calls in CONFIG_CASES],
    *[Case(f"pkl-{i}", "pickle", b, m, kwargs={"allow_pickle": a} if a else {}) for i, b, m, a in PICKLE_CASES],
    *[
        Case(f"name-{i}", "name", same, "Invalid adapter name", kwargs={"adapter_name": n})
        for i, n in enumerate(NAMES)
    ],
    *[
        Case(f"subfolder-{i}", "subfolder", nested, SUB, CONFIG_CALLS, {"subfolder": s})
        for i, s in enumerate(SUBFOLDERS)
    ],
    *[Case(f"zip-{i}", "zip", b, m, ("add_zip",), {"adapter_name": n} if n else {}) for i, b, m, n in ZIP_CASES],
]


# ---- the subprocess ------------------------------------------------------------------------------------------


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def drive() -> None:
    """Subprocess side: ``python -c ... spec.json out.json``; runs every case, records error, time, RSS and files."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    from peft_trainer.lora import LoraLayer
    from peft_trainer_space import limits_from_env
    from peft_trainer_space.engine import AdapterEngine

    root, valid = Path(spec["root"]), spec["valid"]
    engine = AdapterEngine(tiny_llama(), None, "tiny-llama", limits_from_env())
    engine.add(valid, "valid", removable=False)

    def attempt(call: str, path: str, kwargs: dict) -> tuple[Exception | None, bool]:
        """One call: its exception (None if it succeeded), whether the model/engine is as before."""
        kwargs, error = dict(kwargs), None
        base = tiny_llama() if call == "from_pretrained" else None
        model = PeftModel.from_pretrained(tiny_llama(), valid) if call == "load_adapter" else None
        try:
            if call == "config":
                LoraConfig.from_pretrained(path, **kwargs)
            elif call == "from_pretrained":
                PeftModel.from_pretrained(base, path, **kwargs)
            elif call == "load_adapter":
                model.load_adapter(path, kwargs.pop("adapter_name", "other"), **kwargs)
            else:
                engine.add_zip(path, kwargs.get("adapter_name"))
        except Exception as e:
            error = e
        if call == "from_pretrained":
            intact = not any(isinstance(m, LoraLayer) for m in base.modules())
        elif call == "load_adapter":
            intact = list(model.peft_config) == ["default"]
        else:
            intact = engine.names() == ["valid"] and not list(engine._work.glob("upload-*"))
        return error, intact

    for call in ("config", "from_pretrained", "load_adapter"):  # each path once: imports and first allocations
        error, _ = attempt(call, valid, {})
        assert error is None, f"warm-up {call} failed: {error}"
    engine.add_zip(spec["warm_zip"], "warm")
    engine.delete("warm")

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # high-water mark; kB on Linux

    baseline = peak_mb()
    records = {}
    for case in spec["cases"]:
        before, mark = listing(root), peak_mb()
        calls = []
        for call in case["calls"]:
            error, intact = attempt(call, case["path"], case["kwargs"])
            calls.append({"call": call, "intact": intact,
                          "error": type(error).__name__ if error else None, "message": str(error or "")})  # fmt: skip
        after = listing(root)
        print(f"case {case['id']} done", flush=True)  # progress for the parent's wait
        records[case["id"]] = {
            "calls": calls,
            "rss_growth_mb": peak_mb() - mark,  # how far this case pushed the high-water mark
            "rss_total_mb": peak_mb() - baseline,
            "new_files": sorted(set(after) - set(before)),
            "gone_files": sorted(set(before) - set(after)),
        }
    engine.close()
    Path(sys.argv[2]).write_text(json.dumps({"baseline_mb": baseline, "cases": records}))


# ---- the tests -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory):
    """Build every case under ``root/cases``, run them all in one subprocess (TMPDIR inside ``root``), and yield
    (root, records, listing of root before, listing after)."""
    top = tmp_path_factory.mktemp("hostile")
    root, cases_dir, markers = top / "root", top / "root" / "cases", top / "root" / "markers"
    for folder in (cases_dir, markers, root / "tmp"):
        folder.mkdir(parents=True)
    valid = top / "valid"
    torch.manual_seed(0)
    get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).save_pretrained(valid)  # fmt: skip
    spec_cases = []
    for case in CASES:
        folder = cases_dir / case.id
        shutil.copytree(valid, folder)
        path = case.build(folder, markers)
        kwargs = dict(case.kwargs)
        if kwargs.get("subfolder") == "ABSOLUTE":  # known only now: the sibling adapter's absolute path
            kwargs["subfolder"] = str((path.parent / "sibling").resolve())
        spec_cases.append({"id": case.id, "calls": list(case.calls), "path": str(path), "kwargs": kwargs})
    spec = {"root": str(root), "valid": str(valid), "warm_zip": str(zip_adapter(valid, top / "warm.zip")),
            "cases": spec_cases}  # fmt: skip
    (top / "spec.json").write_text(json.dumps(spec))
    before = listing(root)
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "MAX_UPLOAD_MB": str(UPLOAD_MB)}
    code = "from tests.test_hostile_files import drive; drive()"
    proc = processes.run(
        [sys.executable, "-c", code, str(top / "spec.json"), str(top / "out.json")], cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads((top / "out.json").read_text())
    records = out["cases"]
    after = listing(root)
    kinds = Counter(c.kind for c in CASES)
    calls = sum(len(r["calls"]) for r in records.values())
    peak = max(r["rss_total_mb"] for r in records.values())
    print(f"\nhostile inputs tried: {len(CASES)} ({', '.join(f'{k} {n}' for k, n in kinds.items())}); "
          f"{calls} calls; peak RSS {out['baseline_mb']:.0f} MB after warm-up, grew {peak:.1f} MB over the cases")  # fmt: skip
    yield root, records, before, after
    for big in cases_dir.glob("st-*-sparse-*/" + WEIGHTS):  # sparse, but 1 TB and 1 GiB apparent size
        big.unlink()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gets_a_clear_error(hostile, case: Case) -> None:
    _, records, _, _ = hostile
    record = records[case.id]
    for call in record["calls"]:
        where = f"{case.id} via {call['call']}"
        assert call["error"] == "ValueError", f"{where}: {call['error']}: {call['message']}"
        assert re.search(case.message, call["message"]), f"{where}: {call['message']!r} !~ {case.message!r}"
        assert call["intact"], f"{where}: the model or engine was left changed"
    assert record["rss_growth_mb"] < MAX_RSS_GROWTH_MB, f"{case.id}: peak RSS grew {record['rss_growth_mb']:.0f} MB"
    assert record["new_files"] == [] and record["gone_files"] == [], record


def test_no_code_ran_nothing_was_written_outside_memory_stayed_bounded(hostile) -> None:
    root, records, before, after = hostile
    assert max(r["rss_total_mb"] for r in records.values()) < MAX_RSS_GROWTH_MB
    assert list((root / "markers").iterdir()) == [], "a pickle payload ran"
    assert before == after, sorted(set(before) ^ set(after))
    assert not Path("/tmp", OUTSIDE).exists() and not Path(root.anchor, OUTSIDE).exists()
    assert list((root / "tmp").iterdir()) == [], "the engine left files in its temporary folder"


@pytest.mark.parametrize("fmt", ["raw", "torch"])
@pytest.mark.parametrize("gadget", ["exec", "system"])
def test_the_payloads_do_run_code_when_unpickled(tmp_path: Path, fmt: str, gadget: str) -> None:
    """The control: each payload creates its marker under a plain unpickler, so an absent marker above means the
    loader ran nothing (not that the payload was inert)."""
    marker = tmp_path / "marker"
    data = payload(marker, fmt, gadget)
    assert not marker.exists()
    if fmt == "raw":
        pickle.loads(data)
    else:
        (tmp_path / "p.bin").write_bytes(data)
        torch.load(tmp_path / "p.bin", weights_only=False)
    assert marker.exists()
