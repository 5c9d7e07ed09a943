"""The Space's engine without gradio: per-request adapters, concurrency, mutations, bad input, merge and export."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

import peft_trainer_space as space
from peft_trainer import PeftModel
from peft_trainer.errors import CommandError
from peft_trainer.models import load_model
from peft_trainer_space.engine import AdapterEngine, Limits, Sampling
from peft_trainer_space.files import ZipLimits, loss_history
from tests import conftest_hub, space_helpers
from tests.space_helpers import BASE, NEW_TOKENS, PROMPT, ROOT, adapter_paths, encode, make_zip, save_adapter

# fixtures, as assignments so that parameters of the same name are not redefinitions
space_cache, adapter_dir, oracle = space_helpers.space_cache, space_helpers.adapter_dir, space_helpers.oracle
hub_server = conftest_hub.hub_server

GREEDY = Sampling(max_new_tokens=NEW_TOKENS)


def new_engine(adapter_dir: Path, **limits) -> AdapterEngine:
    model, tokenizer = load_model(BASE)
    engine = AdapterEngine(model, tokenizer, BASE, Limits(**limits) if limits else None)
    for name, path in adapter_paths(adapter_dir).items():
        engine.add(str(path), name, removable=False)
    return engine


@pytest.fixture
def engine(adapter_dir: Path):
    engine = new_engine(adapter_dir, max_new_tokens=64)
    yield engine
    engine.close()


def base_weights(engine: AdapterEngine) -> dict[str, torch.Tensor]:
    """The base model's own parameters (LoRA factors excluded), cloned."""
    return {
        k.replace(".base_layer", ""): v.detach().clone() for k, v in engine.base.named_parameters() if "lora_" not in k
    }


def test_engine_module_does_not_import_gradio() -> None:
    code = "import sys, peft_trainer_space, peft_trainer_space.engine, peft_trainer_space.files; assert 'gradio' not in sys.modules, 'gradio imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_each_adapter_gives_its_own_output(engine: AdapterEngine, oracle: dict[str, str]) -> None:
    for name in ("__base__", "pirate", "poet"):
        assert engine.generate(name, PROMPT, GREEDY) == oracle[name], name
    assert engine.generate(None, PROMPT, GREEDY) == oracle["__base__"]


def test_stream_grows_to_the_full_text(engine: AdapterEngine, oracle: dict[str, str]) -> None:
    chunks = list(engine.stream("pirate", PROMPT, GREEDY))
    assert len(chunks) >= 3
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1] == oracle["pirate"]


def test_compare_runs_both_sides(engine: AdapterEngine, oracle: dict[str, str]) -> None:
    *_, last = engine.compare("__base__", "pirate", PROMPT, GREEDY)
    assert last == (oracle["__base__"], oracle["pirate"])
    *_, last = engine.compare("poet", "pirate", PROMPT, GREEDY)
    assert last == (oracle["poet"], oracle["pirate"])


def test_base_is_loaded_once_and_never_changed(adapter_dir: Path, oracle: dict[str, str], monkeypatch) -> None:
    import peft_trainer.models

    calls = []
    real = peft_trainer.models.load_model
    monkeypatch.setattr(peft_trainer.models, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    paths = adapter_paths(adapter_dir)
    engine = AdapterEngine.load(BASE, [("pirate", str(paths["pirate"])), (None, str(paths["poet"]))])
    try:
        assert calls == [(BASE,)] and engine.names() == ["pirate", "poet"]
        model, before = engine.base, base_weights(engine)
        for name in ("pirate", "__base__", "poet", "pirate"):  # switching
            engine.generate(name, PROMPT, GREEDY)
        engine.merge(["pirate", "poet"], None, "both")
        engine.export_merged_model("pirate")  # merge_and_unload on a copy
        engine.export_adapter("both")
        engine.delete("both")
        assert calls == [(BASE,)] and engine.base is model
        after = base_weights(engine)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert engine.generate("__base__", PROMPT, GREEDY) == oracle["__base__"]
        assert engine.generate("pirate", PROMPT, GREEDY) == oracle["pirate"]
    finally:
        engine.close()


def test_eight_concurrent_requests_with_mixed_adapters(engine: AdapterEngine, oracle: dict[str, str]) -> None:
    names = ["pirate", "poet", "__base__", "pirate", "poet", "__base__", "poet", "pirate"]
    start = threading.Barrier(len(names))
    results: dict[int, str] = {}

    def run(i: int, name: str) -> None:
        start.wait()
        results[i] = engine.generate(name, PROMPT, GREEDY)

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(names))] == [oracle[n] for n in names]
    assert engine.peak_in_flight > 1, "the requests were not generating at the same time"


def test_global_switch_would_be_caught(engine: AdapterEngine, oracle: dict[str, str]) -> None:
    """The same burst with a shared set_adapter (what the engine avoids) crosses answers: the check above can fail."""
    peft_model, tokenizer = engine.peft, engine.tokenizer
    inputs = encode(tokenizer, PROMPT)
    names = ["pirate", "poet"] * 4
    start = threading.Barrier(len(names))
    results: dict[int, str] = {}

    def unsafe(i: int, name: str, barrier: threading.Barrier | None = None) -> None:
        if barrier is not None:
            barrier.wait()
        peft_model.set_adapter(name)
        ids = []
        past = None
        step = inputs["input_ids"]
        with torch.no_grad():
            for _ in range(NEW_TOKENS):  # token by token, so the shared switch can flip between steps
                out = peft_model(input_ids=step, past_key_values=past, use_cache=True)
                past = out.past_key_values
                step = out.logits[:, -1:].argmax(-1)
                ids.append(step.item())
                time.sleep(0.002)
        results[i] = tokenizer.decode(ids, skip_special_tokens=True)

    for i, name in enumerate(names[:2]):  # one at a time, this decoding loop gives the right answers
        unsafe(i, name)
        assert results[i] == oracle[name]
    threads = [threading.Thread(target=unsafe, args=(i, n, start)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(results[i] != oracle[n] for i, n in enumerate(names)), "a shared switch did not interfere"


def test_mutations_while_generating(engine: AdapterEngine, oracle: dict[str, str], tmp_path: Path) -> None:
    """Adds, merges and deletes run while 4 threads generate: every answer stays exact, nothing fails."""
    extra = save_adapter(tmp_path / "extra", seed=7)
    stop, errors, answers = threading.Event(), [], []

    def generate_loop(name: str) -> None:
        while not stop.is_set():
            try:
                answers.append((name, engine.generate(name, PROMPT, GREEDY)))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

    threads = [threading.Thread(target=generate_loop, args=(n,)) for n in ("pirate", "poet", "__base__", "pirate")]
    for t in threads:
        t.start()
    try:
        for i in range(3):
            engine.add(str(extra), f"extra{i}")
            engine.merge(["pirate", "poet"], [0.5, 0.5], f"merged{i}")
            engine.delete(f"extra{i}")
            engine.delete(f"merged{i}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert len(answers) >= 4 and all(text == oracle[name] for name, text in answers)
    assert engine.names() == ["pirate", "poet"]


def test_closing_a_stream_early_ends_its_generation(engine: AdapterEngine) -> None:
    stream = engine.stream("pirate", PROMPT, Sampling(max_new_tokens=64))
    next(stream)
    stream.close()
    assert engine.in_flight == 0
    engine.merge(["pirate", "poet"], None, "after")  # the write lock is free again
    assert "after" in engine.names()


def test_merge_matches_add_weighted_adapter(engine: AdapterEngine, oracle: dict[str, str]) -> None:
    assert engine.merge(["pirate", "poet"], [0.5, 0.5], "both", combination_type="svd") == "both"
    assert engine.generate("both", PROMPT, GREEDY) == oracle["both"]
    engine.merge(["pirate", "poet"], None, "cat", combination_type="cat")
    assert engine.card("cat")["r"] == 8
    for kind in ("linear", "ties", "dare_linear", "magnitude_prune_svd"):
        engine.merge(["pirate", "poet"], [1.0, 0.5], kind, combination_type=kind, density=0.5)
        assert engine.generate(kind, PROMPT, GREEDY)


@pytest.mark.parametrize(
    ("adapters", "weights", "name", "kind", "message"),
    [
        (["pirate"], None, "m", "svd", "at least two"),
        (["pirate", "nope"], None, "m", "svd", "Unknown adapter"),
        (["pirate", "poet"], [1.0], "m", "svd", "one finite weight per adapter"),
        (["pirate", "poet"], [1.0, float("nan")], "m", "svd", "one finite weight"),
        (["pirate", "poet"], None, "poet", "svd", "already exists"),
        (["pirate", "poet"], None, "../x", "svd", "Invalid adapter name"),
        (["pirate", "poet"], None, "m", "average", "Unknown combination type"),
    ],
)
def test_merge_errors(engine: AdapterEngine, adapters, weights, name, kind, message) -> None:
    with pytest.raises(ValueError, match=message):
        engine.merge(adapters, weights, name, combination_type=kind)
    assert engine.names() == ["pirate", "poet"] and list(engine.peft.peft_config) == ["pirate", "poet"]


@pytest.mark.parametrize(
    ("adapter", "prompt", "tokens", "message"),
    [
        ("pirate", "", 8, "prompt is empty"),
        ("pirate", "   \n", 8, "prompt is empty"),
        ("pirate", PROMPT, 65, "outside 1..64"),
        ("pirate", PROMPT, 0, "outside 1..64"),
        ("nope", PROMPT, 8, "Unknown adapter 'nope'"),
        ("pirate", "word " * 5000, 8, "tokens long"),
    ],
)
def test_bad_requests_get_clear_errors(engine: AdapterEngine, adapter, prompt, tokens, message) -> None:
    with pytest.raises(ValueError, match=message):
        engine.stream(adapter, prompt, Sampling(max_new_tokens=tokens))


def test_bad_adapters_are_refused_and_the_engine_keeps_serving(
    engine: AdapterEngine, oracle: dict[str, str], tmp_path: Path
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=100))  # fmt: skip
    save_adapter(tmp_path / "other-base", seed=3, base=other)
    non_lora = save_adapter(tmp_path / "prefix", seed=4)
    config = json.loads((non_lora / "adapter_config.json").read_text())
    (non_lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    corrupt = save_adapter(tmp_path / "corrupt", seed=5)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    bad_json = save_adapter(tmp_path / "bad-json", seed=6)
    (bad_json / "adapter_config.json").write_text("{not json")
    pickled = save_adapter(tmp_path / "pickled", seed=6)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    pissa = save_adapter(tmp_path / "pissa", seed=7)
    config = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    cases = {
        "other-base": "does not fit this base model",
        "prefix": "PREFIX_TUNING",
        "corrupt": "truncated or not a safetensors file",
        "bad-json": "not valid JSON",
        "pickled": "pickle",
        "missing": "neither an adapter folder nor a Hub repo id",
        "pissa": r"init_lora_weights='pissa'.*path_initial_model_for_weight_conversion",
    }
    for folder, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            engine.add(str(tmp_path / folder) if folder != "missing" else "./missing/folder")
        assert engine.names() == ["pirate", "poet"]
    with pytest.raises(ValueError, match="Invalid adapter name"):
        engine.add(str(tmp_path / "prefix"), name="a/b")
    assert list(engine.peft.peft_config) == ["pirate", "poet"]
    assert engine.generate("pirate", PROMPT, GREEDY) == oracle["pirate"]
    assert engine.generate("__base__", PROMPT, GREEDY) == oracle["__base__"]


def test_adapter_count_is_capped(adapter_dir: Path) -> None:
    engine = new_engine(adapter_dir, max_adapters=2)
    try:
        with pytest.raises(ValueError, match="at most 2 adapters"):
            engine.merge(["pirate", "poet"], None, "third")
    finally:
        engine.close()


def test_startup_adapters_stay_runtime_ones_can_go(engine: AdapterEngine, adapter_dir: Path) -> None:
    with pytest.raises(ValueError, match="loaded at startup"):
        engine.delete("pirate")
    engine.add(str(adapter_paths(adapter_dir)["pirate"]), "copy")
    engine.delete("copy")
    with pytest.raises(ValueError, match="Unknown adapter"):
        engine.delete("copy")
    assert engine.names() == ["pirate", "poet"]


VARIANTS = {  # peft LoraConfig fields of each LoRA variant the Space serves, on tiny-llama
    "lora": {},
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
    "rslora": {"use_rslora": True},
    "trainable_tokens": {"trainable_token_indices": [5, 9, 17]},
    "target_parameters": {"target_modules": [], "target_parameters": ["mlp.gate_proj.weight"]},
    "layer_replication": {"layer_replication": [[0, 2], [1, 2]]},  # on a model of its own, around the same weights
    "eva": {"init_lora_weights": "eva"},  # started by peft's initialize_lora_eva_weights
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_written_variant_adapter_is_served(
    engine: AdapterEngine, oracle: dict[str, str], tmp_path: Path, variant: str
) -> None:
    """An adapter of each variant, written by peft, gives peft's greedy output, alone and while batched with
    another adapter's request, and leaves the base and the other adapters as they were."""
    import peft

    model, tokenizer = load_model(BASE)
    torch.manual_seed(11)
    fields = {"target_modules": ["q_proj", "o_proj"], "init_lora_weights": False, **VARIANTS[variant]}
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, **fields))
    inputs = encode(tokenizer, PROMPT)
    if variant == "eva":
        from peft.tuners.lora import initialize_lora_eva_weights

        initialize_lora_eva_weights(theirs, [{**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}],
                                    show_progress_bar=False)  # fmt: skip
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if any(part in name for part in ("lora_magnitude_vector", "trainable_tokens_delta", "lora_B")):
                p.add_(torch.randn_like(p) * 0.2)  # away from the initial values, so each part matters
    theirs.save_pretrained(tmp_path / variant)
    with torch.no_grad():
        out = theirs.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert engine.add(str(tmp_path / variant)) == variant
    assert expected != oracle["__base__"], "the adapter changes the output"
    assert engine.generate(variant, PROMPT, GREEDY) == expected
    results: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, engine.generate(n, PROMPT, GREEDY)))
        for n in (variant, "pirate", "__base__")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {variant: expected, "pirate": oracle["pirate"], "__base__": oracle["__base__"]}


def test_a_layer_replication_adapter_runs_on_layers_of_its_own(engine: AdapterEngine, tmp_path: Path) -> None:
    """Its model is a copy of the base's module tree around the same weight tensors; card and export work, merging
    is refused (as in peft), and deleting it frees that model."""
    import peft

    theirs = peft.get_peft_model(load_model(BASE)[0], peft.LoraConfig(r=4, target_modules=["q_proj"],
                                 init_lora_weights=False, layer_replication=[[0, 2], [0, 2]]))  # fmt: skip
    theirs.save_pretrained(tmp_path / "deeper")
    engine.add(str(tmp_path / "deeper"))
    deeper = engine.replicated["deeper"].get_base_model()
    assert len(deeper.model.layers) == 4 and len(engine.base.model.layers) == 2
    weights = {p.data_ptr() for p in engine.base.parameters()}
    assert {p.data_ptr() for n, p in deeper.named_parameters() if "lora_" not in n} <= weights
    assert engine.card("deeper")["trainable_params"] == 4 * 4 * (64 + 64)
    zipfile.ZipFile(engine.export_adapter("deeper")).extractall(tmp_path / "export")
    again = peft.PeftModel.from_pretrained(load_model(BASE)[0], tmp_path / "export" / "deeper")
    ids = torch.tensor([[1, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="set layer_replication"):
        engine.merge(["pirate", "deeper"], None, "mix")
    with pytest.raises(ValueError, match="cannot be merged"):
        engine.export_merged_model("deeper")
    engine.delete("deeper")
    assert "deeper" not in engine.replicated and engine.names() == ["pirate", "poet"]


def test_card_shows_config_parameters_and_loss(engine: AdapterEngine, adapter_dir: Path) -> None:
    card = engine.card("pirate")
    assert (card["r"], card["lora_alpha"], card["target_modules"]) == (4, 16, ["down_proj", "q_proj", "v_proj"])
    a_b = {"q_proj": 64 + 64, "v_proj": 64 + 32, "down_proj": 128 + 64}  # r * (in + out) per layer, 2 layers
    assert card["trainable_params"] == 2 * 4 * sum(a_b.values())
    alone = PeftModel.from_pretrained(load_model(BASE)[0], adapter_paths(adapter_dir)["pirate"], is_trainable=True)
    trainable, total = alone.get_nb_trainable_parameters()  # what training printed as trainable%
    assert card["trainable_percent"] == pytest.approx(100 * trainable / total, rel=1e-12)
    assert card["base_model"] and card["served_base"] == BASE
    assert card["loss"] == [(10.0, 2.5), (20.0, 2.0), (30.0, 1.6)]  # trainer_state.json in the folder
    assert engine.card("poet")["loss"] == [(10.0, 3.0), (20.0, 2.2)]  # ... in the parent folder
    engine.merge(["pirate", "poet"], None, "both")
    assert engine.card("both")["loss"] == []


def test_exported_zip_round_trips_and_loads_in_peft(engine: AdapterEngine, oracle: dict[str, str], tmp_path: Path):
    import peft

    zip_path = engine.export_adapter("pirate")
    names = zipfile.ZipFile(zip_path).namelist()
    assert sorted(names) == sorted(f"pirate/{f}" for f in ("README.md", "adapter_config.json",
                                                           "adapter_model.safetensors", "trainer_state.json"))  # fmt: skip
    assert engine.add_zip(zip_path, "again") == "again"
    assert engine.generate("again", PROMPT, GREEDY) == oracle["pirate"]
    assert engine.card("again")["loss"] == engine.card("pirate")["loss"]
    engine.merge(["pirate", "poet"], [0.5, 0.5], "both")
    zipfile.ZipFile(engine.export_adapter("both")).extractall(tmp_path)
    model, tokenizer = load_model(BASE)
    theirs = peft.PeftModel.from_pretrained(model, tmp_path / "both")
    inputs = encode(tokenizer, PROMPT)
    with torch.no_grad():
        out = theirs.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == oracle["both"]


def test_merged_full_model_download(engine: AdapterEngine, oracle: dict[str, str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    zipfile.ZipFile(engine.export_merged_model("poet")).extractall(tmp_path)
    (folder,) = tmp_path.iterdir()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in k for k in model.state_dict())
    inputs = encode(engine.tokenizer, PROMPT)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == oracle["poet"]
    assert engine.generate("__base__", PROMPT, GREEDY) == oracle["__base__"]  # the served model is untouched
    assert engine.generate("poet", PROMPT, GREEDY) == oracle["poet"]


def test_merged_full_model_download_needs_a_small_base(adapter_dir: Path) -> None:
    engine = new_engine(adapter_dir, max_merged_model_bytes=1000)
    try:
        with pytest.raises(ValueError, match="merged downloads are offered up to"):
            engine.export_merged_model("pirate")
    finally:
        engine.close()


def _unsafe_zips(folder: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    tmp_path.mkdir()
    files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    return {
        "dotdot": (make_zip(tmp_path / "dotdot.zip", {**files, "../evil.txt": b"x"}), "outside its folder"),
        "nested-dotdot": (make_zip(tmp_path / "nd.zip", {f"a/../../{k}": v for k, v in files.items()}), "outside"),
        "absolute": (make_zip(tmp_path / "abs.zip", {**files, "/tmp/evil.txt": b"x"}), "outside its folder"),
        "backslash": (make_zip(tmp_path / "bs.zip", {**files, "..\\evil.txt": b"x"}), "outside its folder"),
        "symlink": (make_zip(tmp_path / "link.zip", files, {"adapter/link": "/etc/passwd"}), "symbolic link"),
        "bomb": (make_zip(tmp_path / "bomb.zip", {**files, "pad.bin": b"\0" * (3 * 2**20)}), "zip bomb"),
        "entries": (make_zip(tmp_path / "many.zip", {**files, **{f"f{i}": b"" for i in range(70)}}), "entries"),
        "no-config": (make_zip(tmp_path / "nocfg.zip", {"adapter_model.safetensors": b"x"}), "No adapter_config"),
        "two": (
            make_zip(
                tmp_path / "two.zip",
                {**{f"a/{k}": v for k, v in files.items()}, **{f"b/{k}": v for k, v in files.items()}},
            ),
            "holds 2 adapters",
        ),  # fmt: skip
        "not-zip": (tmp_path.parent / "plain.zip", "not a readable zip"),
    }


def test_unsafe_uploads_are_refused_before_extraction(adapter_dir: Path, tmp_path: Path) -> None:
    engine = new_engine(adapter_dir, zip=ZipLimits(max_zip_bytes=2**20, max_unzipped_bytes=2 * 2**20, max_entries=64))
    (tmp_path / "plain.zip").write_text("hello")
    cases = _unsafe_zips(adapter_paths(adapter_dir)["pirate"], tmp_path / "zips")
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("adapter_config.json", b"{}")
        zf.writestr("noise.bin", torch.randint(0, 255, (2**20 + 10,), dtype=torch.uint8).numpy().tobytes())
    cases["oversized"] = (big, "over this Space's 1.0 MB limit")
    try:
        for case, (path, message) in cases.items():
            with pytest.raises(ValueError, match=message):
                engine.add_zip(path, case)
        assert engine.names() == ["pirate", "poet"]
        assert not list(engine._work.glob("upload-*")), "a refused upload left files behind"
        corrupt = make_zip(tmp_path / "corrupt.zip", {"adapter_config.json": b"{", "adapter_model.safetensors": b"x"})
        with pytest.raises(ValueError, match=r"^corrupt.zip/adapter_config.json is not valid JSON"):
            engine.add_zip(corrupt)  # names the upload, not the server's temporary folder
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "zips" / "evil.txt").exists()
    finally:
        engine.close()


def test_lying_zip_header_is_caught_while_extracting(tmp_path: Path) -> None:
    from peft_trainer_space.files import extract_adapter_zip

    path = make_zip(tmp_path / "lie.zip", {"adapter_config.json": b"{}", "README.md": b"a" * 4096})
    data = bytearray(path.read_bytes())
    # shrink the README's declared size in the central directory; real data stays 4096 bytes
    index = data.rfind(b"README.md") - 46 + 24
    data[index : index + 4] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt|declared size"):  # never more than the budget is written
        extract_adapter_zip(path, tmp_path / "out", ZipLimits(max_zip_bytes=2**20, max_unzipped_bytes=100))
    written = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert written <= 100


def test_loss_history_reads_trainer_state(tmp_path: Path) -> None:
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    assert loss_history(tmp_path / "run" / "adapter") == []
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 5, "loss": 1.5},
                                                                                     {"eval_loss": 2}]}))  # fmt: skip
    assert loss_history(tmp_path / "run" / "adapter") == [(5.0, 1.5)]
    (tmp_path / "run" / "adapter" / "trainer_state.json").write_text("not json")
    assert loss_history(tmp_path / "run" / "adapter") == []


def test_settings_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    for name in ("b-run", "a-run", "no-adapter"):
        (tmp_path / "outputs" / "quickstart" / name).mkdir(parents=True)
    for name in ("a-run", "b-run"):
        (tmp_path / "outputs" / "quickstart" / name / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert space.parse_adapters(None) == [("a-run", "outputs/quickstart/a-run"), ("b-run", "outputs/quickstart/b-run")]
    assert space.parse_adapters("") == []
    assert space.parse_adapters(" x/y , pirate=./p ,") == [(None, "x/y"), ("pirate", "./p")]
    monkeypatch.setenv("MAX_NEW_TOKENS", "33")
    monkeypatch.setenv("MAX_UPLOAD_MB", "5")
    limits = space.limits_from_env()
    assert limits.max_new_tokens == 33 and limits.zip.max_zip_bytes == 5 * 2**20
    monkeypatch.setenv("MAX_NEW_TOKENS", "many")
    with pytest.raises(ValueError, match="MAX_NEW_TOKENS='many' must be an integer"):
        space.limits_from_env()


def test_push_and_add_from_the_hub(engine: AdapterEngine, oracle: dict[str, str], hub_server) -> None:
    engine.token = hub_server.token  # the Space's own HF_TOKEN: visitors may not push with it ...
    with pytest.raises(ValueError, match="needs your own Hub token.*PUSH_WITH_SPACE_TOKEN=1"):
        engine.push("pirate", "testuser/pirate", token="")
    engine.push_with_space_token = True  # ... unless the Space opts in
    assert engine.push("pirate", "testuser/opt-in", token="").endswith("testuser/opt-in")
    engine.token, engine.push_with_space_token = None, False
    repo = engine.push("pirate", "testuser/pirate-adapter", token=hub_server.token)
    assert repo.endswith("testuser/pirate-adapter")
    with pytest.raises(
        CommandError, match=r"(?s)push of .* to testuser/x failed: HTTP 403: the token may not .*intact"
    ):
        engine.push("pirate", "testuser/x", token="hf_test_read")
    assert engine.add("testuser/pirate-adapter") == "pirate-adapter"
    assert engine.generate("pirate-adapter", PROMPT, GREEDY) == oracle["pirate"]
    assert engine.card("pirate-adapter")["loss"] == engine.card("pirate")["loss"]
    with pytest.raises(ValueError, match="Could not download 'testuser/missing'"):
        engine.add("testuser/missing")
