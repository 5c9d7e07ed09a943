"""The `peft-trainer` CLI: every recipe parses, --help everywhere, overrides, a tiny end-to-end train, merge, push to
the local fake Hub, bad data (exit 2 + file/row/column), quickstart machinery on tiny-llama, behaviour checks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import peft
import pytest
import torch
import yaml

from peft_trainer import LoraConfig, PeftModel, card, get_peft_model, models
from peft_trainer.behaviour import PIRATE_SIGNATURE, is_json_answer, is_pirate
from peft_trainer.cli import COMMANDS, main
from peft_trainer.errors import UsageError
from peft_trainer.hub import files_to_push
from peft_trainer.recipe import RECIPES_DIR, parse_recipe
from tests import conftest_hub

hub_server = conftest_hub.hub_server  # the fixture; an assignment, so parameters named hub_server are not F811

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((RECIPES_DIR).glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))
QUIET = ["--disable_tqdm", "true", "--report_to", "none"]


pytestmark = pytest.mark.usefixtures("embedded_cache")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _chat_rows(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                      {"role": "assistant", "content": json.dumps({"topic": "math", "answer": str(i + 1)})}]}
        for i in range(n)
    ]  # fmt: skip


def _recipe(folder: Path, **fields) -> Path:
    """A tiny-llama recipe next to its data (``dataset`` relative to the recipe, as in recipes/)."""
    values = {
        "model_name_or_path": "tiny-llama", "dataset": "train.jsonl", "max_length": 64, "lora_r": 4,
        "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": "1e-2", "per_device_train_batch_size": 4,
        "max_steps": 3, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        "seed": 7, "output_dir": str(folder / "out"), **fields,
    }  # fmt: skip
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny end-to-end `train` (chat data, 25% eval split, eval every step): its output folder."""
    folder = tmp_path_factory.mktemp("train")
    _write_jsonl(folder / "train.jsonl", _chat_rows(12))
    recipe = _recipe(folder, eval_ratio=0.25, eval_strategy="steps", eval_steps=1)
    assert main(["train", str(recipe)]) == 0
    return folder / "out"


# ---- recipes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_its_files_exist(path: Path) -> None:
    recipe = parse_recipe(path)
    assert recipe.training.output_dir.startswith("outputs/")
    assert Path(recipe.data.dataset).is_file(), recipe.data.dataset
    if recipe.behaviour.behaviour:
        assert Path(recipe.behaviour.behaviour_prompts).is_file()
    assert path.read_text().startswith("#"), "each recipe opens with a comment saying what it trains"
    if recipe.model.task == "seq-cls":
        assert recipe.training.lora_modules_to_save == ["classifier"]
    if "qlora" in path.name:
        assert recipe.training.load_in_4bit and recipe.training.bnb_4bit_quant_type == "nf4"


# recipe: (what it sets, as the LoraConfig or arguments show it; overrides that fit it to tiny-llama)
VARIANT_RECIPES = {
    "dora-smollm2": (lambda config, args: config.use_dora, []),
    "loraplus-smollm2": (lambda config, args: args.loraplus_lr_ratio == 16, []),
    "pissa-smollm2": (lambda config, args: config.init_lora_weights == "pissa", []),
    "lora-bias-smollm2": (lambda config, args: config.lora_bias is True, []),
    "trainable-tokens-smollm2": (lambda config, args: config.trainable_token_indices == [1, 2], []),
    "layer-replication-smollm2": (
        lambda config, args: config.layer_replication == [[0, 20], [10, 30]],
        ["--layer_replication", "0-2,1-2"],
    ),
    "moe-experts-tiny-mixtral": (lambda config, args: config.target_parameters is not None, []),
}


@pytest.mark.parametrize("name", VARIANT_RECIPES)
def test_each_lora_variant_recipe_trains_an_adapter_peft_loads(name: str, tmp_path: Path) -> None:
    """Each variant's recipe sets its field; run on a tiny base for two steps, peft loads the result as we do."""
    sets_variant, fit_tiny = VARIANT_RECIPES[name]
    recipe = parse_recipe(name)
    assert sets_variant(recipe.training.to_lora_config(), recipe.training)
    base = recipe.model.model_name_or_path if recipe.model.model_name_or_path.startswith("tiny-") else "tiny-llama"
    args = [
        "--model_name_or_path",
        base,
        "--max_steps",
        "2",
        "--warmup_steps",
        "0",
        "--learning_rate",
        "1e-2",
        "--lora_r",
        "4",
    ]
    assert main(["train", name, *args, "--output_dir", str(tmp_path), *QUIET, *fit_tiny]) == 0
    ids = torch.tensor([[1, 42, 7, 99, 2]])
    with torch.no_grad():
        ours = PeftModel.from_pretrained(models.load_model(base)[0], tmp_path).eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(models.load_model(base)[0], tmp_path).eval()(ids).logits
        plain = models.load_model(base)[0].eval()(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if name != "layer-replication-smollm2":  # 4 layers instead of 2: different anyway
        assert not torch.allclose(ours, plain, atol=1e-4), "the trained adapter changes the output"


def test_shipped_recipes_are_found_by_name_from_any_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = parse_recipe("quickstart-pirate", ["--max_steps", "1"])
    assert Path(recipe.path) == RECIPES_DIR / "quickstart-pirate.yaml" and recipe.training.max_steps == 1
    assert Path(recipe.data.dataset).is_file() and Path(recipe.data.dataset).is_relative_to(RECIPES_DIR)
    with pytest.raises(UsageError, match="did you mean quickstart-pirate"):
        parse_recipe("quickstart-pirat")
    assert main(["train", "quickstart-pirat"]) == 2
    listed = capsys.readouterr().err.split("shipped recipes: ")[1]
    assert listed.startswith("dora-smollm2, ") and all(p.stem in listed for p in RECIPES)
    pyproject = (ROOT / "pyproject.toml").read_text()  # and they go into the wheel with the package
    assert all(f'"recipes/{pattern}"' in pyproject for pattern in ("*.yaml", "accelerate/*.yaml", "data/*.jsonl"))


def test_quickstart_recipes_train_two_different_behaviours_on_the_embedded_default() -> None:
    recipes = [parse_recipe(p) for p in sorted((RECIPES_DIR).glob("quickstart-*.yaml"))]
    assert len(recipes) >= 2
    assert {r.model.model_name_or_path for r in recipes} == {"smollm2-135m-instruct"}
    assert len({r.behaviour.behaviour for r in recipes}) == len(recipes)
    assert all(r.training.output_dir.startswith("outputs/quickstart/") for r in recipes)
    assert all(r.data.eval_ratio > 0 and r.training.eval_strategy != "no" for r in recipes)  # score logged in training


def test_accelerate_configs_parse_and_say_when_to_use_them() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in ACCELERATE_CONFIGS:
        assert path.read_text().startswith("# "), f"{path.name}: opens with a comment saying when to use it"
        config = load_config_from_file(str(path))
        kinds[path.stem] = (str(config.distributed_type.value), config.num_processes)
        if config.distributed_type.value == "DEEPSPEED":
            assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
        if config.distributed_type.value == "FSDP":
            assert config.fsdp_config["fsdp_version"] == 2
    assert kinds == {
        "single": ("NO", 1), "ddp": ("MULTI_GPU", 2), "fsdp2": ("FSDP", 2), "deepspeed-zero2": ("DEEPSPEED", 2),
        "deepspeed-zero3": ("DEEPSPEED", 2),
    }  # fmt: skip


def test_quickstart_data_script_is_deterministic_and_matches_the_committed_files(tmp_path: Path) -> None:
    script = RECIPES_DIR / "data" / "make_quickstart_data.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    written = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert written == [
        "quickstart_heldout.jsonl",
        "quickstart_json.jsonl",
        "quickstart_pirate.jsonl",
        "sentiment.jsonl",
    ]
    for name in written:
        assert (tmp_path / name).read_bytes() == (RECIPES_DIR / "data" / name).read_bytes(), name
    json_rows = [json.loads(line) for line in (tmp_path / "quickstart_json.jsonl").read_text().splitlines()]
    assert all(is_json_answer(r["completion"]) for r in json_rows)
    pirate_rows = [json.loads(line) for line in (tmp_path / "quickstart_pirate.jsonl").read_text().splitlines()]
    assert all(is_pirate(r["messages"][-1]["content"]) for r in pirate_rows)


# ---- parsing, overrides, validation -----------------------------------------------------------------------------


def test_command_line_overrides_the_recipe_and_paths_resolve_next_to_it(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", _chat_rows(4))
    path = _recipe(tmp_path, lora_target_modules=["q_proj"])
    recipe = parse_recipe(
        path, ["--lora_r", "8", "--learning_rate", "0.5", "--lora_target_modules", "q_proj", "v_proj"]
    )
    assert recipe.training.lora_r == 8 and recipe.training.learning_rate == 0.5
    assert recipe.training.lora_target_modules == ["q_proj", "v_proj"]
    assert recipe.training.lora_alpha == 8 and recipe.training.max_steps == 3  # untouched: from the recipe
    assert recipe.data.dataset == str(tmp_path / "train.jsonl")  # relative to the recipe, not the cwd
    plain = parse_recipe(path)
    assert plain.training.learning_rate == 1e-2  # "1e-2" is a string to PyYAML; converted like a CLI value
    assert plain.training.lora_target_modules == ["q_proj"]


def test_invalid_recipe_reports_every_problem_at_once(tmp_path: Path, capsys) -> None:
    path = _recipe(tmp_path, lora_rank=8, lora_dropout=1.5, task="chat", eval_strategy="steps", dataset=None)
    with pytest.raises(UsageError) as err:
        parse_recipe(path, ["--behaviour", "pirate"])
    message = str(err.value)
    for expected in ("unknown field 'lora_rank' (did you mean", "'lora_r'", "lora_dropout=1.5", "task='chat'",
                     "behaviour and behaviour_prompts go together", "dataset: name the training data",
                     "eval_strategy is set but there is no eval data"):  # fmt: skip
        assert expected in message, message
    assert main(["train", str(path), "--no_such_field", "1"]) == 2
    err_text = capsys.readouterr().err
    assert "unknown command-line argument(s): --no_such_field 1" in err_text and "Traceback" not in err_text
    with pytest.raises(UsageError, match=r"--max_step 1 .*did you mean --max_steps\?"):  # never taken as --max_steps
        parse_recipe(_recipe(tmp_path), ["--max_step", "1"])


def test_a_wrong_target_module_exits_2_naming_the_candidates(tmp_path: Path, capsys) -> None:
    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "completion": "a"}] * 4)
    assert main(["train", str(_recipe(tmp_path, lora_target_modules=["q_projj"]))]) == 2
    err = capsys.readouterr().err
    assert "Target modules ['q_projj'] not found" in err and "'q_proj'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_for_every_subcommand(command: str, capsys) -> None:
    assert main([command, "--help"] if command else ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if not command:
        assert all(name in out for name in COMMANDS)
    if command == "train":
        assert "--lora_r" in out and "--dataset" in out and "--behaviour" in out and "--learning_rate" in out


def test_train_help_shows_this_projects_fields_first_and_all_fields_on_request(capsys) -> None:
    from dataclasses import fields

    from transformers import TrainingArguments

    main(["train", "--help"])
    short = capsys.readouterr().out
    assert short.index("--lora_r") < short.index("--behaviour") < short.index("--learning_rate")
    assert "--adam_beta1" not in short and "--help-all lists all" in short
    main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert all(f"--{f.name} " in full or f"--{f.name}," in full for f in fields(TrainingArguments) if f.init)
    assert len(short.splitlines()) < len(full.splitlines()) / 2


def test_console_script_and_module_entry_points() -> None:
    result = subprocess.run([sys.executable, "-m", "peft_trainer.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "quickstart" in result.stdout
    script = Path(sys.executable).parent / "peft-trainer"
    if script.exists():  # installed by pip install -e .
        result = subprocess.run([str(script), "merge", "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "--weights" in result.stdout
    assert main(["trian"]) == 2


# ---- train --------------------------------------------------------------------------------------------------------


def test_train_end_to_end_writes_a_peft_loadable_adapter(trained: Path) -> None:
    files = {p.name for p in trained.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    base, tokenizer = models.load_model("tiny-llama")
    ours = PeftModel.from_pretrained(base, str(trained))
    theirs = peft.PeftModel.from_pretrained(models.load_model("tiny-llama")[0], str(trained))
    ids = tokenizer("What is 3 plus 1?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
        with ours.disable_adapter():
            plain = ours(input_ids=ids).logits
        assert not torch.allclose(plain, ours(input_ids=ids).logits)  # training moved the adapter
    meta, _ = card.split_front_matter((trained / "README.md").read_text())
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    from peft_trainer_space.files import loss_history  # the Space's adapter card plots this file's losses

    assert len(loss_history(trained)) >= 2 and "trainer_state.json" in files


def test_train_logs_loss_eval_split_and_truncation(tmp_path: Path, capsys, caplog) -> None:
    long_row = {"prompt": "word " * 200, "completion": "short answer"}
    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(7)] + [long_row])
    caplog.set_level("INFO", logger="peft_trainer")
    assert main(["train", str(_recipe(tmp_path, eval_ratio=0.25, max_steps=2))]) == 0
    out, logs = capsys.readouterr().out, caplog.text
    assert "'loss'" in out and "train_loss" in out
    assert "eval split: 2 of 8 rows held out" in logs
    assert "1 truncated to max_length=64" in logs
    assert "distributed: NO, 1 process(es)" in logs


def test_train_with_packing_and_text_data(tmp_path: Path, caplog) -> None:
    _write_jsonl(tmp_path / "train.jsonl", [{"text": f"Sentence number {i} is short."} for i in range(12)])
    caplog.set_level("INFO", logger="peft_trainer")
    assert main(["train", str(_recipe(tmp_path, packing=True, max_length=32, max_steps=1))]) == 0
    assert "(text, packed), 0 truncated to max_length=32" in caplog.text
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("eval_ratio", [0.0, 0.25])
def test_bad_data_exits_2_naming_file_row_and_column(tmp_path: Path, capsys, eval_ratio: float) -> None:
    rows = _chat_rows(8)
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}  # line 3: no content
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["train", str(_recipe(tmp_path, eval_ratio=eval_ratio))]) == 2
    err = capsys.readouterr().err
    assert f"{data}: row 3, column 'messages': message 2: key 'content' is missing" in err, err
    assert "Traceback" not in err


def test_bad_data_from_the_shell_is_one_message_and_exit_code_2(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "peft_trainer.cli", "train", str(_recipe(tmp_path))], capture_output=True, text=True,
        env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "train.jsonl: row 2, column 'completion': missing value" in result.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "peft_trainer.cli", "train", str(tmp_path / "nope.yaml")], capture_output=True,
        text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert missing.returncode == 2 and "nope.yaml: no such recipe file" in missing.stderr


# ---- merge --------------------------------------------------------------------------------------------------------


def _random_adapter(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    base, _ = models.load_model("tiny-llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")  # fmt: skip
    get_peft_model(base, config).save_pretrained(str(folder))
    return folder


def test_merge_writes_a_full_model_and_weighted_combination_writes_an_adapter(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    a, b = _random_adapter(tmp_path / "a", 1), _random_adapter(tmp_path / "b", 2)
    ids = torch.randint(1, 1000, (2, 9))

    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "merged")]) == 0  # base taken from adapter_config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    both = PeftModel.from_pretrained(models.load_model("tiny-llama")[0], str(a), adapter_name="a")
    both.load_adapter(str(b), adapter_name="b")
    both.set_adapter(["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, both(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    out = tmp_path / "combined"
    assert (
        main(["merge", str(a), str(b), "--weights", "0.7", "0.3", "--combination-type", "linear", "-o", str(out)]) == 0
    )
    both.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="linear")
    both.set_adapter("mix")
    theirs = peft.PeftModel.from_pretrained(models.load_model("tiny-llama")[0], str(out))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, both(input_ids=ids).logits)

    assert main(["merge", str(a), "-o", str(out)]) == 2  # not empty: refused, nothing overwritten
    assert "not empty" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--weights", "1", "-o", str(tmp_path / "x")]) == 2


# ---- push ---------------------------------------------------------------------------------------------------------


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _with_junk(trained: Path, tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    (folder / "model.safetensors").write_bytes(b"full base weights")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"old")
    (folder / "notes.txt").write_text("local notes")
    return folder


def test_push_uploads_only_adapter_card_and_tokenizer_files(trained: Path, tmp_path: Path, hub_server) -> None:
    from huggingface_hub import HfApi

    folder = _with_junk(trained, tmp_path)
    events = folder / "runs" / "Dec07_10-00-00_host" / "events.out.tfevents.1.host"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"tensorboard events")
    before = _tree_digest(folder)
    assert main(["push", str(folder), "--repo-id", "tiny-adapter", "--private"]) == 0
    repo = f"{hub_server.user}/tiny-adapter"
    uploaded = set(HfApi().list_repo_files(repo)) - {".gitattributes"}
    assert uploaded == set(files_to_push(folder))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= uploaded
    assert "runs/Dec07_10-00-00_host/events.out.tfevents.1.host" in uploaded  # the Hub's metrics tab reads these
    assert not uploaded & {
        "model.safetensors",
        "training_args.bin",
        "notes.txt",
        "checkpoint-2/adapter_model.safetensors",
    }
    assert _tree_digest(folder) == before


def test_push_namespace_pushes_each_folder_and_prints_the_space_adapters(
    trained: Path, tmp_path: Path, hub_server, capsys
) -> None:
    import shutil

    folders = [tmp_path / "quickstart" / name for name in ("json", "pirate")]
    for folder in folders:
        shutil.copytree(trained, folder)
    assert main(["push", *map(str, folders), "--namespace", hub_server.user]) == 0
    out = capsys.readouterr().out
    for folder in folders:
        pushed = hub_server.repo_files(f"{hub_server.user}/{folder.name}")
        assert pushed["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    assert f"ADAPTERS=json={hub_server.user}/json,pirate={hub_server.user}/pirate" in out.splitlines()
    assert main(["push", *map(str, folders), "--repo-id", "one"]) == 2  # one repo id for two folders: refused
    assert "use --namespace" in capsys.readouterr().err


def test_behaviour_recipe_with_push_to_hub_pushes_once_with_the_score(tmp_path: Path, hub_server) -> None:
    _write_jsonl(tmp_path / "train.jsonl", _chat_rows(8))
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 plus 1?"}, {"prompt": "Hi"}])
    recipe = _recipe(tmp_path, max_steps=2, behaviour="json_answer", behaviour_prompts=str(prompts),
                     behaviour_max_new_tokens=4, push_to_hub=True, hub_model_id="scored")  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    repo = f"{hub_server.user}/scored"
    assert hub_server.commit_titles(repo)[:-1] == ["End of training"]  # one push (the last title: repo creation)
    card = hub_server.repo_files(repo)["README.md"].decode()
    assert "## Behaviour score" in card and card == (tmp_path / "out" / "README.md").read_text()


def test_behaviour_scores_the_final_weights_once(tmp_path: Path, caplog) -> None:
    """An evaluation at the last step scores the final weights; training's end reuses that score."""
    _write_jsonl(tmp_path / "train.jsonl", _chat_rows(8))
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 plus 1?"}, {"prompt": "Hi"}])
    recipe = _recipe(tmp_path, max_steps=2, eval_ratio=0.25, eval_strategy="steps", eval_steps=2,
                     behaviour="json_answer", behaviour_prompts=str(prompts), behaviour_max_new_tokens=4)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="peft_trainer"):
        assert main(["train", str(recipe)]) == 0
    scorings = [r.getMessage() for r in caplog.records if "scoring 2 prompts" in r.getMessage()]
    assert [m.rsplit("prompts ", 1)[1] for m in scorings] == ["before training (base model)", "at step 2"]
    assert "after training: the score at step 2" in caplog.text
    report = json.loads((tmp_path / "out" / "behaviour_eval.json").read_text())
    assert report["after"]["total"] == 2


def test_push_failure_names_the_cause_and_leaves_local_files_intact(trained: Path, tmp_path: Path, hub_server, capsys):
    folder = _with_junk(trained, tmp_path)
    before = _tree_digest(folder)
    assert main(["push", str(folder), "--repo-id", "tiny-adapter", "--token", "hf_not_a_token"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "token was refused" in err and "local files" in err and "intact" in err, err
    assert "Traceback" not in err
    hub_server.inject(r"/commit/", "403", count=5)
    assert main(["push", str(folder), "--repo-id", "tiny-adapter"]) == 1
    assert "HTTP 403" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), "--repo-id", "x"]) == 2  # not an adapter folder: no request made
    assert "not an adapter output folder" in capsys.readouterr().err
    assert _tree_digest(folder) == before


# ---- space and quickstart -----------------------------------------------------------------------------------------


@pytest.fixture
def fake_space(monkeypatch):
    calls: list[dict] = []
    module = types.ModuleType("peft_trainer_space")
    module.launch = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "peft_trainer_space", module)
    return calls


def test_quickstart_trains_scores_and_starts_the_space_on_tiny_llama(tmp_path: Path, fake_space, capsys) -> None:
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is the capital of Japan?"}, {"prompt": "Hi"}])
    args = ["quickstart", "--output-root", str(tmp_path / "qs"), "--model_name_or_path", "tiny-llama",
            "--max_steps", "2", "--eval_steps", "1", "--behaviour_prompts", str(prompts),
            "--behaviour_max_new_tokens", "4", *QUIET]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    names = sorted(p.stem.removeprefix("quickstart-") for p in (RECIPES_DIR).glob("quickstart-*.yaml"))
    assert fake_space == [{
        "base_model": "tiny-llama", "adapters": [f"{n}={tmp_path / 'qs' / n}" for n in names], "host": None,
        "port": None,
    }]  # fmt: skip
    assert out.count("'eval_behaviour_score'") >= 3 * len(names)  # before training + after each of the 2 steps
    for name in names:
        folder = tmp_path / "qs" / name
        card = (folder / "README.md").read_text()
        assert "## Behaviour score" in card and "base model (before training)" in card
        report = json.loads((folder / "behaviour_eval.json").read_text())
        check = {"json": is_json_answer, "pirate": is_pirate}[name]  # the report's verdicts are the check's
        for when in ("before", "after"):
            samples = report[when]["samples"]
            assert [s["pass"] for s in samples] == [check(s["answer"]) for s in samples] and len(samples) == 2
            assert report[when]["score"] == sum(s["pass"] for s in samples) / 2 == report[when]["passed"] / 2
        assert f"behaviour '{report['after']['check']}' on 2 held-out prompts:" in out

    assert main([*args, "--no-space"]) == 0  # same recipes: reused, not trained again
    again = capsys.readouterr().out
    assert again.count("already trained") == len(names) and "'loss'" not in again
    assert len(fake_space) == 1


# ---- behaviour checks -----------------------------------------------------------------------------------------------


def test_behaviour_checks() -> None:
    assert is_json_answer('{"topic": "math", "answer": "4"}')
    assert is_json_answer('  {"answer": "Paris", "topic": "geography"}\n')
    for bad in ('{"topic": "math"}', '{"topic": "math", "answer": "4", "x": "y"}', '{"topic": "math",\n"answer": "4"}',
                'Sure! {"topic": "math", "answer": "4"}', '{"topic": "", "answer": "4"}', "[1, 2]", ""):  # fmt: skip
        assert not is_json_answer(bad), bad
    assert is_pirate(f"Arr, matey! Paris be the capital.\n{PIRATE_SIGNATURE}")
    for bad in ("Arr, matey! Paris.", f"Paris.\n{PIRATE_SIGNATURE}", f"Arr, matey!\n{PIRATE_SIGNATURE}",
                f"Arr, matey! Paris.\n{PIRATE_SIGNATURE}\nP.S."):  # fmt: skip
        assert not is_pirate(bad), bad


def test_accuracy_metric_loads_offline_through_evaluate(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from peft_trainer.metrics import load_metric

    metric = load_metric("accuracy")
    assert type(metric).__module__.split(".")[0] != "peft_trainer"  # evaluate's own loader built it from the file
    assert metric.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 1]) == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("rouge")


def test_the_library_does_not_import_the_space_or_gradio() -> None:
    """Every library module imports without the Space package (only `peft-trainer space` starts it) or gradio."""
    import pkgutil

    import peft_trainer

    names = [m.name for m in pkgutil.walk_packages(peft_trainer.__path__, "peft_trainer.")]
    code = f"import sys; [__import__(n) for n in {names!r}]; print(sorted(m for m in sys.modules " \
           "if m.split('.')[0] in ('peft_trainer_space', 'gradio')))"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
    assert len(names) > 20
