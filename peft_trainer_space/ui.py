"""build_demo(engine) -> gr.Blocks: chat, compare, adapter card, merge, train, export/push/add; thin handlers."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
import pandas as pd

from peft_trainer.errors import PeftTrainerError
from peft_trainer.lora.combine import COMBINATION_TYPES

from .engine import BASE, AdapterEngine, Sampling
from .training import AdapterTraining, TrainSettings, read_rows
from .zerogpu import gpu_task

log = logging.getLogger("peft_trainer_space")
BASE_LABEL = "base model (no adapter)"
# What each of add_weighted_adapter's combination types does, one line each (the Merge tab shows the chosen one).
_F = " (on the A and B factors: equal ranks)"
_SVD = " on the full updates ΔW, refactored to the SVD rank by SVD"
MERGE_HELP = {
    "cat": "stacks the adapters side by side: rank = sum of ranks, exactly the weighted sum of their updates",
    "linear": "weighted sum of the A and B factors (equal ranks): cheap, only approximately the sum of updates",
    "svd": "weighted sum of the full updates ΔW, refactored to the SVD rank by SVD: accurate, slower",
    "ties": "TIES: keeps each adapter's largest entries (density), elects a sign per entry, sums" + _F,
    "ties_svd": "TIES (largest entries, elected signs)" + _SVD,
    "dare_linear": "DARE: drops random entries (keeping density), rescales the rest, sums" + _F,
    "dare_ties": "DARE's random drop and rescale, then TIES' sign election" + _F,
    "dare_linear_svd": "DARE's random drop and rescale" + _SVD,
    "dare_ties_svd": "DARE's random drop and rescale with TIES' sign election" + _SVD,
    "magnitude_prune": "keeps each adapter's largest entries (density), sums" + _F,
    "magnitude_prune_svd": "keeps each update's largest entries (density)" + _SVD,
}
# Spaces set OAUTH_CLIENT_ID when the README front matter says hf_oauth: true; locally there is no sign-in.
SIGN_IN = bool(os.environ.get("OAUTH_CLIENT_ID"))


def _user_errors(fn: Callable) -> Callable:
    """Show any failure as a clear message for this user only (gr.Error); the app keeps serving the others."""

    def convert(e: Exception) -> gr.Error:
        expected = isinstance(
            e, (PeftTrainerError, ValueError, OSError, KeyError)
        )  # the user's input: one log line, no traceback
        if expected:
            log.info("handler %s refused a request: %s", fn.__name__, e)
        else:
            log.exception("handler %s failed", fn.__name__)
        return gr.Error(str(e) or type(e).__name__, print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any) -> Iterator[Any]:
            try:
                yield from fn(*args)
            except gr.Error:
                raise
            except Exception as e:
                raise convert(e) from None

        return stream

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except gr.Error:
            raise
        except Exception as e:
            raise convert(e) from None

    return call


def _weights(text: str) -> list[float] | None:
    parts = [p for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        return [float(p) for p in parts] or None
    except ValueError:
        raise ValueError(f"Weights must be numbers separated by commas, got {text!r}") from None


def conversation(history: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """A Chatbot's history as plain ``{"role", "content"}`` turns (Gradio hands content over as a list of parts)."""
    turns = []
    for message in history or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        elif isinstance(content, dict):
            content = content.get("text", "")
        turns.append({"role": message.get("role"), "content": content if isinstance(content, str) else ""})
    return turns


def _loss_frame(points: list[tuple[int, float]]) -> pd.DataFrame:
    """(step, loss) points as the LinePlots take them; numeric even when empty (an empty frame of object columns
    would make the plot's axes categorical for the rest of the stream)."""
    return pd.DataFrame({"step": pd.Series([p[0] for p in points], dtype="int64"),
                         "loss": pd.Series([p[1] for p in points], dtype="float64")})  # fmt: skip


def _card_markdown(card: dict[str, Any]) -> str:
    targets = card["target_modules"]
    rows = [
        ("rank r", f"{card['r']}" + (f" (per-layer: {card['rank_pattern']})" if card["rank_pattern"] else "")),
        ("lora_alpha", f"{card['lora_alpha']:g}" + (" (rsLoRA)" if card["use_rslora"] else "")),
        ("target modules", targets if isinstance(targets, str) else ", ".join(targets)),
        ("base model (adapter config)", card["base_model"] or "not recorded"),
        ("base model (served)", card["served_base"]),
        (
            "trainable parameters",
            f"{card['trainable_params']:,} ({card['trainable_percent']:.4f}%, as training printed it)",
        ),
        ("source", card["source"]),
    ]
    table = "\n".join(f"| {k} | `{v}` |" for k, v in rows)
    note = "" if card["loss"] else "\n\nNo training log (trainer_state.json) next to this adapter."
    return f"### {card['name']}\n\n| field | value |\n|---|---|\n{table}{note}"


TRAIN_HELP = (
    "Train a new adapter on `{base}` from your own rows: JSON Lines or CSV with `prompt` and `completion` columns, "
    "or JSON Lines with `messages`. At most {rows} rows, {steps} steps and {minutes:g} minutes; one training at a "
    "time, and chatting goes on meanwhile. The adapter joins the others (chat, compare, merge, export, push) when "
    "it has finished."
)
EXAMPLE_ROWS = (
    '{"prompt": "Greet me like a pirate.", "completion": "Arr, matey! Ahoy to ye.\\n— Captain Lora"}\n'
    '{"prompt": "Say good night like a pirate.", "completion": "Arr, matey! Sleep well on the waves.\\n— Captain Lora"}'
)


def build_demo(engine: AdapterEngine, concurrency: int = 8, training: AdapterTraining | None = None) -> gr.Blocks:
    """The Space's UI over ``engine``; each request carries its own adapter choice (component values are
    per session), so users never switch adapters for each other. ``training``: the Train tab's runner (default:
    one with the default limits)."""
    cap = engine.limits.max_new_tokens
    training = training or AdapterTraining(engine)
    tl = training.limits

    def adapter_choices(with_base: bool = True) -> list[tuple[str, str]]:
        return ([(BASE_LABEL, BASE)] if with_base else []) + [(n, n) for n in engine.names()]

    def first_adapter() -> str | None:
        names = engine.names()
        return names[0] if names else None

    def sampling(max_new_tokens: float, do_sample: bool, temperature: float, top_p: float, top_k: float, chat: bool):
        return Sampling(int(max_new_tokens), bool(do_sample), float(temperature), float(top_p), int(top_k), bool(chat))

    with gr.Blocks(title="peft-trainer: LoRA adapters", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"# LoRA adapters on `{engine.base_name}`\nThe base model is loaded once; each request picks its "
            "adapter without touching anyone else's."
        )
        if engine.startup_errors:
            gr.Markdown(
                "**Some adapters could not be loaded:**\n" + "\n".join(f"- {e}" for e in engine.startup_errors)
            )
        with gr.Accordion("Sampling settings (used by Chat, Compare and Merge)", open=False):
            with gr.Row():  # min_width: on a narrow screen the row wraps instead of clipping the labels
                max_new = gr.Slider(1, cap, value=min(128, cap), step=1, label="Max new tokens", min_width=220)
                do_sample = gr.Checkbox(False, label="Sample (off: greedy)", min_width=220)
                chat = gr.Checkbox(True, label="Apply the chat template", min_width=220)
            with gr.Row():
                temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k")
        settings = [max_new, do_sample, temperature, top_p, top_k, chat]

        with gr.Tabs():
            with gr.Tab("Chat"):
                adapter = gr.Dropdown(adapter_choices(), value=BASE, label="Adapter", allow_custom_value=True)
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=360)
                message = gr.Textbox(label="Message", lines=2, elem_id="message", placeholder="Type and press Send")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    retry = gr.Button("Retry the last answer", elem_id="retry")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Tab("Compare"):
                with gr.Row():
                    left = gr.Dropdown(adapter_choices(), value=BASE, label="Left", allow_custom_value=True)
                    right = gr.Dropdown(
                        adapter_choices(), value=first_adapter() or BASE, label="Right", allow_custom_value=True
                    )
                with gr.Row():
                    left_chat = gr.Chatbot(label="Left", elem_id="left-chat", height=320)
                    right_chat = gr.Chatbot(label="Right", elem_id="right-chat", height=320)
                compare_message = gr.Textbox(label="Message to both", lines=2, elem_id="compare-message")
                with gr.Row():
                    compare_go = gr.Button("Send to both", variant="primary", elem_id="compare-send")
                    compare_clear = gr.Button("Clear both")
            with gr.Tab("Adapter card"):
                card_pick = gr.Dropdown(
                    adapter_choices(False), value=first_adapter(), label="Adapter to inspect", allow_custom_value=True
                )
                card_md = gr.Markdown(label="Adapter card")
                loss_plot = gr.LinePlot(x="step", y="loss", label="Training loss", height=260)
            with gr.Tab("Merge"):
                merge_pick = gr.Dropdown(
                    engine.names(), multiselect=True, allow_custom_value=True, label="Adapters to merge (two or more)"
                )
                with gr.Row():
                    weights = gr.Textbox(label="Weights, comma-separated (empty: equal)", placeholder="0.5, 0.5")
                    combination = gr.Dropdown(list(COMBINATION_TYPES), value="svd", label="Combination type")
                merge_help = gr.Markdown(f"`svd`: {MERGE_HELP['svd']}", elem_id="merge-help")
                with gr.Row():
                    svd_rank = gr.Number(0, precision=0, label="SVD rank (0: largest input rank)")
                    density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Density (ties, dare, prune)")
                    merged_name = gr.Textbox("merged", label="Name of the new adapter", elem_id="merged-name")
                try_prompt = gr.Textbox(label="Try it on this prompt", lines=2, elem_id="try-prompt")
                merge_go = gr.Button("Merge and try", variant="primary", elem_id="merge")
                merge_status = gr.Textbox(label="Status", interactive=False, elem_id="merge-status")
                try_out = gr.Textbox(
                    label="Output of the merged adapter", lines=6, interactive=False, elem_id="try-output"
                )
            with gr.Tab("Train"):
                gr.Markdown(TRAIN_HELP.format(base=engine.base_name, rows=tl.max_rows, steps=tl.max_steps,
                                              minutes=tl.max_seconds / 60))  # fmt: skip
                with gr.Row():
                    rows_text = gr.Textbox(label="Rows (JSON Lines or CSV)", lines=8, elem_id="train-rows",
                                           placeholder=EXAMPLE_ROWS)  # fmt: skip
                    rows_file = gr.File(label="...or upload a .jsonl or .csv file", file_types=[".jsonl", ".json", ".csv"],
                                        elem_id="train-file")  # fmt: skip
                with gr.Row():
                    train_name = gr.Textbox("my-adapter", label="Adapter name", elem_id="train-name")
                    rank = gr.Slider(1, tl.max_rank, value=min(16, tl.max_rank), step=1, label="Rank r")
                    steps = gr.Slider(1, tl.max_steps, value=min(30, tl.max_steps), step=1, label="Steps",
                                      elem_id="train-steps")  # fmt: skip
                    learning_rate = gr.Number(1e-3, label="Learning rate", minimum=0)
                with gr.Row():
                    train_go = gr.Button("Train", variant="primary", elem_id="train")
                    cancel_go = gr.Button("Cancel the training", variant="stop", elem_id="cancel-training")
                train_status = gr.Textbox(label="Training", interactive=False, elem_id="train-status")
                train_plot = gr.LinePlot(x="step", y="loss", label="Training loss (live)", height=260,
                                         elem_id="train-plot")  # fmt: skip
            with gr.Tab("Export & add"):
                export_pick = gr.Dropdown(
                    adapter_choices(False), value=first_adapter(), label="Adapter to export, push or delete",
                    allow_custom_value=True,
                )  # fmt: skip
                with gr.Row():
                    export_go = gr.Button("Download adapter (PEFT zip)")
                    merged_go = gr.Button(
                        f"Download merged full model (base up to {engine.limits.max_merged_model_bytes >> 20} MB)"
                    )
                download = gr.File(label="Download", interactive=False)
                gr.Markdown(
                    "**Push to the Hub** with your own account: "
                    + ("sign in with Hugging Face, or type a write token." if SIGN_IN else "type a write token.")
                )
                if SIGN_IN:
                    gr.LoginButton()
                with gr.Row():
                    push_repo = gr.Textbox(label="Hub repo id to push to", placeholder="your-name/my-adapter")
                    push_token = gr.Textbox(
                        "", label="Hub token (write; empty: your sign-in)", type="password", placeholder="hf_..."
                    )
                    push_private = gr.Checkbox(True, label="Private repo")
                push_go = gr.Button("Push to the Hub")
                with gr.Accordion("Remove an adapter you added in this session", open=False):
                    delete_go = gr.Button("Delete the adapter chosen above", variant="stop")
                with gr.Row():
                    hub_repo = gr.Textbox(label="Add from a Hub repo id", placeholder="owner/adapter-repo")
                    upload = gr.File(label="...or upload a zipped adapter folder", file_types=[".zip"])
                    new_name = gr.Textbox(label="Name (optional)")
                with gr.Row():
                    hub_go = gr.Button("Add from the Hub")
                    upload_go = gr.Button("Add the uploaded zip")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")

        lists = [adapter, left, right, card_pick, merge_pick, export_pick]
        mine = gr.State([])  # names this session added: only those may it delete (others may be using the rest)

        def refreshed(chat_value: str | None = None) -> list[Any]:
            """New choices for every adapter list (this session); optionally select ``chat_value`` in Chat."""
            full, names = adapter_choices(), adapter_choices(False)
            chat_update = gr.update(choices=full, value=chat_value) if chat_value else gr.update(choices=full)
            return [chat_update, gr.update(choices=full), gr.update(choices=full), gr.update(choices=names),
                    gr.update(choices=engine.names()), gr.update(choices=names)]  # fmt: skip

        @gpu_task
        @_user_errors
        def generate(
            adapter: str, prompt: str, max_new_tokens: float = 128, do_sample: bool = False, temperature: float = 0.7,
            top_p: float = 0.95, top_k: float = 50, chat_template: bool = True,
        ) -> Iterator[str]:  # fmt: skip
            """One prompt, no history: the answer so far after each new piece."""
            s = sampling(max_new_tokens, do_sample, temperature, top_p, top_k, chat_template)
            yield from engine.stream(adapter, prompt, s)

        @gpu_task
        @_user_errors
        def compare(
            left: str, right: str, prompt: str, max_new_tokens: float = 128, do_sample: bool = False,
            temperature: float = 0.7, top_p: float = 0.95, top_k: float = 50, chat_template: bool = True,
        ) -> Iterator[tuple[str, str]]:  # fmt: skip
            """One prompt to two adapters at once: (left answer, right answer) so far."""
            s = sampling(max_new_tokens, do_sample, temperature, top_p, top_k, chat_template)
            yield from engine.compare(left, right, prompt, s)

        def answer(adapter: str, turns: list[dict[str, str]], s: Sampling) -> Iterator[list[dict[str, str]]]:
            for text in engine.stream(adapter, turns, s):
                yield [*turns, {"role": "assistant", "content": text}]

        @gpu_task
        @_user_errors
        def chat(
            adapter: str, text: str, history: list, max_new_tokens: float, do_sample: bool, temperature: float,
            top_p: float, top_k: float, chat_template: bool,
        ) -> Iterator[tuple[list, str]]:  # fmt: skip
            """The conversation so far plus ``text``, answered by ``adapter``: (conversation, cleared message box)."""
            turns = [*conversation(history), {"role": "user", "content": text}]
            s = sampling(max_new_tokens, do_sample, temperature, top_p, top_k, chat_template)
            for updated in answer(adapter, turns, s):
                yield updated, ""

        @gpu_task
        @_user_errors
        def retry_last(
            adapter: str, history: list, max_new_tokens: float, do_sample: bool, temperature: float, top_p: float,
            top_k: float, chat_template: bool,
        ) -> Iterator[list]:  # fmt: skip
            """The last answer again (a new one when sampling)."""
            turns = conversation(history)
            while turns and turns[-1]["role"] == "assistant":
                turns.pop()
            if not turns:
                raise ValueError("Nothing to retry yet: send a message first")
            yield from answer(
                adapter, turns, sampling(max_new_tokens, do_sample, temperature, top_p, top_k, chat_template)
            )

        @gpu_task
        @_user_errors
        def compare_chat(
            left: str, right: str, text: str, left_history: list, right_history: list, max_new_tokens: float,
            do_sample: bool, temperature: float, top_p: float, top_k: float, chat_template: bool,
        ) -> Iterator[tuple[list, list, str]]:  # fmt: skip
            """The same message to both sides; each side continues its own conversation."""
            user = {"role": "user", "content": text}
            turns = [[*conversation(left_history), user], [*conversation(right_history), user]]
            s = sampling(max_new_tokens, do_sample, temperature, top_p, top_k, chat_template)
            for a, b in engine.compare(left, right, turns[0], s, right_prompt=turns[1]):
                yield ([*turns[0], {"role": "assistant", "content": a}],
                       [*turns[1], {"role": "assistant", "content": b}], "")  # fmt: skip

        @_user_errors
        def show_card(adapter: str | None) -> tuple[str, pd.DataFrame]:
            if not adapter:
                return "No adapter loaded.", _loss_frame([])
            card = engine.card(adapter)
            return _card_markdown(card), _loss_frame(card["loss"])

        @gpu_task
        @_user_errors
        def merge(
            adapters: list[str], weights: str, combination_type: str, svd_rank: float, density: float, name: str,
            prompt: str, max_new_tokens: float, do_sample: bool, temperature: float, top_p: float, top_k: float,
            chat_template: bool, added: list[str],
        ) -> Iterator[tuple]:  # fmt: skip
            rank = int(svd_rank or 0) or None
            created = engine.merge(adapters or [], _weights(weights), name.strip(), combination_type, rank, density)
            status = f"Created {created!r}; Chat now uses it."
            # Chat switches to the new adapter: its conversation so far was another adapter's, so it is cleared
            yield status, "", *refreshed(created), [*added, created], []
            if prompt.strip():
                s = sampling(max_new_tokens, do_sample, temperature, top_p, top_k, chat_template)
                for piece in engine.stream(created, prompt, s):
                    yield status, piece, *[gr.skip()] * (len(lists) + 2)

        @_user_errors
        def train(
            rows: str, upload: str | None, name: str, rank: float, steps: float, learning_rate: float, added: list[str]
        ) -> Iterator[tuple]:  # fmt: skip
            """Start a training and stream its status and loss curve; when it is done, every list shows it."""
            settings = TrainSettings((name or "").strip(), int(rank), int(steps), float(learning_rate or 0))
            run = training.start(read_rows(rows, upload, tl), settings)
            keep = [gr.skip()] * (len(lists) + 1)
            while not run.finished.wait(0.5):
                yield run.summary(), _loss_frame(run.losses), *keep
            done = run.status == "done"
            yield (run.summary(), _loss_frame(run.losses),
                   *(refreshed(run.name) + [[*added, run.name]] if done else keep))  # fmt: skip

        @_user_errors
        def add_from_hub(repo: str, name: str, added: list[str]) -> list[Any]:
            new = engine.add(repo, name.strip() or None)
            return [f"Added {new!r} from {repo}.", *refreshed(), [*added, new]]

        @_user_errors
        def add_zip(zip_file: str | None, name: str, added: list[str]) -> list[Any]:
            if not zip_file:
                raise ValueError("Choose a .zip file first")
            new = engine.add_zip(zip_file, name.strip() or None)
            return [f"Added {new!r} from the upload.", *refreshed(), [*added, new]]

        @_user_errors
        def delete(adapter: str, added: list[str]) -> list[Any]:
            if adapter not in added:
                raise ValueError(f"{adapter!r} was not added in this session; you can delete only adapters you added")
            engine.delete(adapter)
            return [f"Deleted {adapter!r}.", *refreshed(), [a for a in added if a != adapter]]

        @_user_errors
        def export_adapter(adapter: str) -> str:
            return str(engine.export_adapter(adapter))

        @gpu_task
        @_user_errors
        def export_merged(adapter: str) -> str:
            return str(engine.export_merged_model(adapter))

        @_user_errors
        def push(adapter: str, repo_id: str, token: str, private: bool, oauth_token: gr.OAuthToken | None) -> str:
            """With the typed token, else the signed-in visitor's own (Gradio fills ``oauth_token`` on Spaces)."""
            token = (token or "").strip() or (oauth_token.token if oauth_token is not None else "")
            return f"Pushed {adapter!r} to {engine.push(adapter, repo_id, token, private)}"

        gr.api(generate, api_name="generate")
        gr.api(compare, api_name="compare")
        gr.on([send.click, message.submit], chat, [adapter, message, chatbot, *settings], [chatbot, message],
              api_name="chat")  # fmt: skip
        retry.click(retry_last, [adapter, chatbot, *settings], chatbot, api_name="retry")
        clear.click(lambda: ([], ""), None, [chatbot, message], api_visibility="private")
        gr.on([compare_go.click, compare_message.submit], compare_chat,
              [left, right, compare_message, left_chat, right_chat, *settings], [left_chat, right_chat, compare_message],
              api_name="compare_chat")  # fmt: skip
        compare_clear.click(lambda: ([], [], ""), None, [left_chat, right_chat, compare_message],
                            api_visibility="private")  # fmt: skip
        card_pick.change(show_card, card_pick, [card_md, loss_plot], api_name="card")
        merge_go.click(
            merge, [merge_pick, weights, combination, svd_rank, density, merged_name, try_prompt, *settings, mine],
            [merge_status, try_out, *lists, mine, chatbot], api_name="merge",
        )  # fmt: skip
        combination.change(lambda kind: f"`{kind}`: {MERGE_HELP.get(kind, '')}", combination, merge_help,
                           api_visibility="private")  # fmt: skip
        export_go.click(export_adapter, export_pick, download, api_name="export_adapter")
        merged_go.click(export_merged, export_pick, download, api_name="export_merged")
        delete_go.click(delete, [export_pick, mine], [status, *lists, mine], api_name="delete_adapter")
        push_go.click(push, [export_pick, push_repo, push_token, push_private], status, api_name="push")
        train_go.click(train, [rows_text, rows_file, train_name, rank, steps, learning_rate, mine],
                       [train_status, train_plot, *lists, mine], api_name="train", show_progress="minimal")  # fmt: skip
        cancel_go.click(lambda: training.cancel(), None, train_status, api_name="cancel_training")
        hub_go.click(add_from_hub, [hub_repo, new_name, mine], [status, *lists, mine], api_name="add_from_hub")
        upload_go.click(add_zip, [upload, new_name, mine], [status, *lists, mine], api_name="add_zip")
        demo.load(lambda name: [*refreshed(), *show_card(name)], card_pick, [*lists, card_md, loss_plot],
                  api_visibility="private")  # fmt: skip
    return demo.queue(default_concurrency_limit=concurrency)
