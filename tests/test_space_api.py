"""The Space through its API: `python app.py` on 127.0.0.1 in its own process group, driven by gradio_client."""

from __future__ import annotations

import json
import re
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from peft_trainer_space.ui import conversation
from tests import processes, space_helpers
from tests.space_helpers import (
    BASE,
    NEW_TOKENS,
    PROMPT,
    adapter_paths,
    encode,
    greedy,
    make_zip,
    save_adapter,
    zip_adapter,
)

space_cache, adapter_dir, oracle = space_helpers.space_cache, space_helpers.adapter_dir, space_helpers.oracle
CAP = 16


@pytest.fixture(scope="module")
def app(adapter_dir: Path, space_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The app with BASE_MODEL=tiny-llama and two adapters; yields (url, log file); always stopped afterwards."""
    cwd = tmp_path_factory.mktemp("space_app")
    paths = adapter_paths(adapter_dir)
    env = {"BASE_MODEL": BASE, "ADAPTERS": f"pirate={paths['pirate']},{paths['poet']}", "MAX_NEW_TOKENS": str(CAP),
           "MAX_UPLOAD_MB": "1", "PEFT_TRAINER_CACHE": str(space_cache),
           "HF_TOKEN": "hf_the_spaces_own_token"}  # fmt: skip
    log = cwd / "app.log"
    proc, url = space_helpers.start_app(env, log, cwd)
    try:
        yield url, log
    finally:
        space_helpers.stop_app(proc)


@pytest.fixture(scope="module")
def client(app: tuple[str, Path]) -> Client:
    return Client(app[0], analytics_enabled=False, verbose=False)


def gen(adapter: str, prompt: str = PROMPT, tokens: int = NEW_TOKENS) -> tuple:
    """/generate arguments: adapter, prompt, max_new_tokens, do_sample, temperature, top_p, top_k, chat_template."""
    return adapter, prompt, tokens, False, 0.7, 0.95, 50, True


def test_named_endpoints(client: Client) -> None:
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(named) == {"/generate", "/compare", "/chat", "/retry", "/compare_chat", "/card", "/merge",
                          "/export_adapter", "/export_merged", "/delete_adapter", "/push", "/train", "/cancel_training",
                          "/add_from_hub", "/add_zip"}  # fmt: skip
    params = [p["parameter_name"] for p in named["/generate"]["parameters"]]
    assert params == ["adapter", "prompt", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                      "chat_template"]  # fmt: skip


@pytest.mark.parametrize("adapter", ["__base__", "pirate", "poet"])
def test_generate_with_each_adapter(client: Client, oracle: dict[str, str], adapter: str) -> None:
    assert client.predict(*gen(adapter), api_name="/generate") == oracle[adapter]


def test_api_labels_every_output_and_marks_optional_inputs(client: Client) -> None:
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    unnamed = [
        (path, r["label"]) for path, e in named.items() for r in e["returns"] if r["label"].startswith("value_")
    ]
    assert not unnamed, unnamed
    assert [r["label"] for r in named["/card"]["returns"]] == ["Adapter card", "Training loss"]
    optional = {p["parameter_name"]: p["parameter_has_default"] for p in named["/push"]["parameters"]}
    assert optional["token"] and optional["private"] and not optional["repo_id"]  # token: typed, else the sign-in


def test_log_has_no_share_hint_or_deprecation_warnings(client: Client, app: tuple[str, Path]) -> None:
    client.predict(*gen("pirate"), api_name="/generate")
    log = app[1].read_text(errors="replace")
    assert "Running on local URL:" in log
    assert "share=True" not in log and "past_key_values" not in log and "deprecated" not in log.lower(), log


def test_generate_streams(client: Client, oracle: dict[str, str]) -> None:
    job = client.submit(*gen("poet"), api_name="/generate")
    chunks = list(job)
    assert len(chunks) >= 3 and all(b.startswith(a) for a, b in zip(chunks, chunks[1:]))
    assert job.result() == chunks[-1] == oracle["poet"]


def test_eight_concurrent_requests_with_mixed_adapters(client: Client, app, oracle: dict[str, str]) -> None:
    names = ["pirate", "poet", "__base__", "poet", "pirate", "__base__", "pirate", "poet"]
    jobs = [client.submit(*gen(name), api_name="/generate") for name in names]
    assert [job.result(timeout=processes.HANG_S) for job in jobs] == [oracle[n] for n in names]
    in_flight = [int(n) for n in re.findall(r"in_flight=(\d+)", app[1].read_text(errors="replace"))]
    assert max(in_flight) > 1, "the server never ran two generations at once"


def test_compare_side_by_side(client: Client, oracle: dict[str, str]) -> None:
    args = gen("__base__")[2:]
    assert client.predict("__base__", "pirate", PROMPT, *args, api_name="/compare") == [oracle["__base__"],
                                                                                         oracle["pirate"]]  # fmt: skip
    assert client.predict("poet", "pirate", PROMPT, *args, api_name="/compare") == [oracle["poet"], oracle["pirate"]]


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content.strip()}  # the Chatbot shows (and sends back) answers stripped


def test_chat_is_a_conversation_through_the_chat_template(client: Client, adapter_dir: Path, oracle) -> None:
    settings = gen("pirate")[2:]
    first, box = client.predict("pirate", PROMPT, [], *settings, api_name="/chat")
    assert box == "" and conversation(first) == [_turn("user", PROMPT), _turn("assistant", oracle["pirate"])]
    second, _ = client.predict("pirate", "And then?", first, *settings, api_name="/chat")
    model, tokenizer = space_helpers.oracle_model(adapter_dir)
    asked = [*conversation(first), _turn("user", "And then?")]
    assert conversation(second) == [*asked, _turn("assistant", greedy(model, tokenizer, "pirate", asked))]
    assert conversation(client.predict("pirate", second, *settings, api_name="/retry")) == conversation(second)
    with pytest.raises(AppError, match="Nothing to retry"):
        client.predict("pirate", [], *settings, api_name="/retry")

    # Compare: one message to both sides, each continuing its own conversation.
    left, right, _ = client.predict("poet", "pirate", PROMPT, [], [], *settings, api_name="/compare_chat")
    left, right, _ = client.predict("poet", "pirate", "And then?", left, right, *settings, api_name="/compare_chat")
    for name, side in (("poet", left), ("pirate", right)):
        turns = conversation(side)
        assert turns[1] == _turn("assistant", oracle[name]) and turns[2] == _turn("user", "And then?")
        assert turns[3] == _turn("assistant", greedy(model, tokenizer, name, turns[:3])), name


def test_adapter_card_and_loss_curve(client: Client) -> None:
    markdown, plot = client.predict("pirate", api_name="/card")
    for fact in ("rank r | `4`", "lora_alpha | `16`", "down_proj, q_proj, v_proj", "3,328", "tiny-llama"):
        assert fact in markdown
    assert plot["data"] == [[10.0, 2.5], [20.0, 2.0], [30.0, 1.6]]
    _, plot = client.predict("poet", api_name="/card")  # trainer_state.json in the parent folder
    assert plot["data"] == [[10.0, 3.0], [20.0, 2.2]]


def test_merge_then_try_at_once(client: Client, oracle: dict[str, str]) -> None:
    job = client.submit(["pirate", "poet"], "0.5, 0.5", "svd", 0, 0.5, "both", PROMPT, *gen("")[2:],
                        api_name="/merge")  # fmt: skip
    status, tried, *_ = job.result()
    assert "Created 'both'" in status and tried == oracle["both"]
    assert job.outputs()[0][-1] == []  # Chat switched to 'both': the previous adapter's conversation is cleared
    assert client.predict(*gen("both"), api_name="/generate") == oracle["both"]
    with pytest.raises(AppError, match="already exists"):
        client.predict(["pirate", "poet"], "", "svd", 0, 0.5, "both", "", *gen("")[2:], api_name="/merge")
    with pytest.raises(AppError, match="at least two"):
        client.predict(["pirate"], "", "svd", 0, 0.5, "solo", "", *gen("")[2:], api_name="/merge")


def test_export_upload_and_delete(client: Client, oracle: dict[str, str]) -> None:
    exported = Path(client.predict("pirate", api_name="/export_adapter"))
    assert sorted(zipfile.ZipFile(exported).namelist())[:3] == ["pirate/README.md", "pirate/adapter_config.json",
                                                                 "pirate/adapter_model.safetensors"]  # fmt: skip
    status, *_ = client.predict(handle_file(str(exported)), "pirate-copy", api_name="/add_zip")
    assert status == "Added 'pirate-copy' from the upload."
    assert client.predict(*gen("pirate-copy"), api_name="/generate") == oracle["pirate"]
    status, *_ = client.predict("pirate-copy", api_name="/delete_adapter")
    assert status == "Deleted 'pirate-copy'."
    with pytest.raises(AppError, match="Unknown adapter 'pirate-copy'"):
        client.predict(*gen("pirate-copy"), api_name="/generate")
    with pytest.raises(AppError, match="you can delete only adapters you added"):
        client.predict("pirate", api_name="/delete_adapter")


def test_a_session_deletes_only_its_own_adapters(app, client: Client, adapter_dir: Path, tmp_path: Path) -> None:
    """Per-session state: another user cannot delete an adapter this session uploaded (and may be using)."""
    upload = zip_adapter(adapter_paths(adapter_dir)["poet"], tmp_path / "poet.zip", "poet")
    client.predict(handle_file(str(upload)), "poet-mine", api_name="/add_zip")
    other = Client(app[0], analytics_enabled=False, verbose=False)
    with pytest.raises(AppError, match="'poet-mine' was not added in this session"):
        other.predict("poet-mine", api_name="/delete_adapter")
    assert client.predict("poet-mine", api_name="/delete_adapter")[0] == "Deleted 'poet-mine'."


def test_merged_full_model_download(client: Client, oracle: dict[str, str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zipfile.ZipFile(client.predict("poet", api_name="/export_merged")).extractall(tmp_path)
    (folder,) = tmp_path.iterdir()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    inputs = encode(tokenizer, PROMPT)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == oracle["poet"]
    assert client.predict(*gen("poet"), api_name="/generate") == oracle["poet"]  # the served model is untouched


@pytest.fixture(scope="module")
def bad_zips(adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bad_zips")
    files = {f.name: f.read_bytes() for f in adapter_paths(adapter_dir)["pirate"].iterdir() if f.is_file()}
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=100))  # fmt: skip
    non_lora = json.loads(files["adapter_config.json"])
    noise = torch.randint(0, 255, (2**20 + 1000,), dtype=torch.uint8).numpy().tobytes()
    return {
        "traversal": make_zip(root / "traversal.zip", {**files, "../../evil.py": b"print(1)"}),
        "absolute": make_zip(root / "absolute.zip", {**files, "/etc/evil": b"x"}),
        "symlink": make_zip(root / "symlink.zip", files, {"adapter/readme": "/etc/passwd"}),
        "bomb": make_zip(root / "bomb.zip", {**files, "zeros.bin": b"\0" * (70 * 2**20)}),
        "other-base": zip_adapter(save_adapter(root / "other", seed=3, base=other), root / "other.zip", "other"),
        "non-lora": make_zip(
            root / "prefix.zip",
            {**files, "adapter_config.json": json.dumps({**non_lora, "peft_type": "PREFIX_TUNING"}).encode()},
        ),  # fmt: skip
        "corrupt": make_zip(root / "corrupt.zip", {**files, "adapter_model.safetensors": b"\x00garbage"}),
        "not-a-zip": root.joinpath("fake.zip").write_bytes(b"PK but not really") and root / "fake.zip",
        "oversized": make_zip(root / "big.zip", {**files, "noise.bin": noise}),
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("traversal", "outside its folder"),
        ("absolute", "outside its folder"),
        ("symlink", "symbolic link"),
        ("bomb", "zip bomb"),
        ("other-base", "does not fit this base model"),
        ("non-lora", "PREFIX_TUNING"),
        ("corrupt", "not a safetensors file"),
        ("not-a-zip", "not a readable zip"),
        ("oversized", "exceeds the maximum file size of 1048576 bytes"),  # refused by the client (app config)
    ],
)
def test_bad_uploads_get_a_clear_message(client: Client, bad_zips, oracle, case: str, message: str) -> None:
    with pytest.raises(Exception, match=message):
        client.predict(handle_file(str(bad_zips[case])), case, api_name="/add_zip")
    assert client.predict(*gen("pirate"), api_name="/generate") == oracle["pirate"]  # still serving


def test_server_refuses_oversized_uploads_itself(app, bad_zips, client: Client, oracle) -> None:
    """A client that ignores the advertised limit is stopped by the server (MAX_UPLOAD_MB=1 -> max_file_size)."""
    import httpx

    data = bad_zips["oversized"].read_bytes()
    response = httpx.post(f"{app[0]}/gradio_api/upload", files={"files": ("big.zip", data, "application/zip")})
    assert response.status_code == 413 and "1048576" in response.text
    assert client.predict(*gen("pirate"), api_name="/generate") == oracle["pirate"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (gen("pirate", prompt=""), "prompt is empty"),
        (gen("pirate", prompt="  "), "prompt is empty"),
        (gen("pirate", tokens=CAP + 1), f"greater than maximum value {CAP}|cap"),
        (gen("nope"), "Unknown adapter 'nope'"),
    ],
)
def test_bad_requests_get_a_clear_message(client: Client, oracle, args: tuple, message: str) -> None:
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate")
    assert client.predict(*gen("poet"), api_name="/generate") == oracle["poet"]


def test_add_from_hub_and_push_report_clear_errors(client: Client) -> None:
    with pytest.raises(AppError, match="needs your own Hub token.*sign in"):  # never the Space's own HF_TOKEN
        client.predict("pirate", "someone/pirate", "", True, api_name="/push")
    with pytest.raises(AppError, match="not a Hub repo id"):
        client.predict("pirate", "no slash", "hf_x", True, api_name="/push")
    with pytest.raises(AppError, match="Could not download 'someone/missing'"):  # HF_HUB_OFFLINE=1 in this app
        client.predict("someone/missing", "", api_name="/add_from_hub")
    with pytest.raises(AppError, match="neither an adapter folder nor a Hub repo id"):
        client.predict("not a repo", "", api_name="/add_from_hub")


def test_expected_user_errors_log_one_line_and_no_traceback(app, client: Client) -> None:
    with pytest.raises(AppError, match="Unknown adapter 'missing'"):
        client.predict(*gen("missing"), api_name="/generate")
    log = app[1].read_text()
    assert "refused a request: Unknown adapter 'missing'" in log
    # Every error so far (bad uploads, requests, pushes) was the user's input. The one traceback left is Gradio's own
    # input check (a slider value over its maximum), which Gradio prints before any handler of ours runs.
    blocks = log.split("Traceback (most recent call last):")[1:]
    ours = [b for b in blocks if "raise_if_out_of_bounds" not in b]
    assert len(blocks) <= 1 and not ours, ours[:1]


def test_base_model_loaded_once_over_all_requests(app) -> None:
    log = app[1].read_text(errors="replace")
    assert log.count("loading base model tiny-llama") == 1 and "added adapter" in log


def test_cli_space_command_serves_the_same_outputs(adapter_dir: Path, space_cache: Path, tmp_path: Path, oracle):
    """``peft-trainer space --base-model ... --adapter name=folder`` starts the same Space (host/port from the env)."""
    paths = adapter_paths(adapter_dir)
    command = [sys.executable, "-m", "peft_trainer.cli", "space", "--base-model", BASE, "--adapter",
               f"pirate={paths['pirate']}"]  # fmt: skip
    proc, url = space_helpers.start_app({"PEFT_TRAINER_CACHE": str(space_cache)}, tmp_path / "cli.log", tmp_path,
                                        command=command)  # fmt: skip
    try:
        client = Client(url, analytics_enabled=False, verbose=False)
        assert client.predict(*gen("pirate"), api_name="/generate") == oracle["pirate"]
    finally:
        space_helpers.stop_app(proc)


def test_no_network_unless_asked(adapter_dir: Path, space_cache: Path, tmp_path: Path, oracle) -> None:
    """With the environment a Space gets (no HF_HUB_OFFLINE, no analytics switch), serving a page and generating
    reach no host but 127.0.0.1 (Python audit hook on DNS lookups and connects in the app process).

    peft, the tests' oracle, is not in the Space's requirements and is hidden from the app: where it is installed,
    transformers imports it, it imports bitsandbytes, and bitsandbytes' CPU backend asks the Hub for a kernel."""
    guard = space_helpers.netguard(tmp_path / "guard", hide=("peft",))
    env = {"BASE_MODEL": BASE, "ADAPTERS": str(adapter_paths(adapter_dir)["pirate"]), "MAX_NEW_TOKENS": str(CAP),
           "PEFT_TRAINER_CACHE": str(space_cache), **guard}  # fmt: skip
    proc, url = space_helpers.start_app(env, tmp_path / "app.log", tmp_path, unset=(
        "GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "GRADIO_SHARE"))  # fmt: skip
    try:
        import httpx

        assert httpx.get(url).status_code == 200
        client = Client(url, analytics_enabled=False, verbose=False)
        assert client.predict(*gen("pirate"), api_name="/generate") == oracle["pirate"]
        time.sleep(2)  # background version checks / telemetry would have started by now
    finally:
        space_helpers.stop_app(proc)
    log = tmp_path / "guard" / "attempts.log"
    assert not log.exists(), log.read_text()


def test_merge_tab_explains_every_combination_type() -> None:
    from peft_trainer.lora.combine import COMBINATION_TYPES
    from peft_trainer_space.ui import MERGE_HELP

    assert set(MERGE_HELP) == set(COMBINATION_TYPES)
