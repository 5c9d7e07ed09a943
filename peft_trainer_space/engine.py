"""AdapterEngine: one base model loaded once, LoRA adapters beside it, a per-request adapter, merge and export."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import logging
import math
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from peft_trainer import card, hub, io
from peft_trainer.config import LoraConfig, decomposes_base
from peft_trainer.folders import validate_adapter_name
from peft_trainer.lora.combine import COMBINATION_TYPES
from peft_trainer.lora.layer import AdapterState
from peft_trainer.lora.model import BASE, PeftModel, attach_adapter, numel
from peft_trainer.models import _HUB_ID  # the one definition of an "owner/name" repo id
from peft_trainer.prompts import encode_chat, encode_prompts

from . import files
from .batcher import Batcher, Request, sampling_processors

log = logging.getLogger("peft_trainer_space")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each has an environment variable in ``space.limits_from_env``."""

    max_new_tokens: int = 512
    max_prompt_tokens: int = 4096
    max_adapters: int = 32
    zip: files.ZipLimits = files.ZipLimits()
    max_merged_model_bytes: int = 2 * 2**30


@dataclass(frozen=True)
class Sampling:
    """Generation settings of one request; greedy unless ``do_sample``."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    chat_template: bool = True

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
                    "top_k": None}  # fmt: skip
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k}  # fmt: skip


@dataclass(frozen=True)
class Adapter:
    """Where an adapter came from; ``folder`` holds its files (None for merged ones); startup ones stay."""

    name: str
    source: str
    folder: Path | None
    removable: bool


class RWLock:
    """Many readers (generations, exports) or one writer (add/merge/delete); a waiting writer holds back new readers,
    so a structural change waits for running generations and no generation ever sees a half-added adapter."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Stop(StoppingCriteria):
    """Ends generation at the next token once ``event`` is set (the reader went away or a compare was cancelled)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def default_name(source: str) -> str:
    """An adapter name from a folder or repo id: its last part, with characters other than [A-Za-z0-9_-] as '-'."""
    tail = Path(source.rstrip("/\\")).name or "adapter"
    return re.sub(r"[^A-Za-z0-9_-]", "-", tail)


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and ".." not in source


def check_keeps_base(config: LoraConfig, name: str) -> None:
    """Refuse an adapter whose loading would rewrite the base weights that every adapter and the base share."""
    init = config.init_lora_weights
    if decomposes_base(init):
        raise ValueError(
            f"Adapter {name!r} has init_lora_weights={init!r}: loading it would turn the shared base into its "
            "residual. Save it as a plain LoRA (PeftTrainer does this for its final adapter; in a script use "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...)) and add that one"
        )


def check_conversation(messages: list[Any]) -> list[dict[str, str]]:
    """A conversation as ``[{"role", "content"}]`` with string contents, ending with a non-empty user turn."""
    roles = ("system", "user", "assistant")
    clean = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise ValueError(f"Message {i} must be {{'role': one of {roles}, 'content': text}}, got {m!r}")
        clean.append({"role": m["role"], "content": m["content"]})
    if not clean or clean[-1]["role"] != "user" or not clean[-1]["content"].strip():
        raise ValueError("The conversation must end with a message from you: type something to answer")
    return clean


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree around ``model``'s own parameter and buffer tensors."""
    return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})


class AdapterEngine:
    """Serves ``model`` (loaded once, never reloaded or modified) with any number of LoRA adapters beside it.

    Each call names its adapter (``"__base__"``/None = the bare base): generation selects it with
    ``PeftModel.use_adapter`` in the generating thread only, so concurrent requests never see each other's
    choice. Adding, merging and deleting adapters take the write side of one lock. An adapter with
    ``layer_replication`` changes which layers run, so it gets a model of its own: a copy of the base's module tree
    around the same weight tensors (no second copy of the weights), generating outside the shared batch.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, base_name: str, limits: Limits | None = None,
        token: str | None = None, push_with_space_token: bool = False, batching: bool = True,
    ) -> None:  # fmt: skip
        self.base = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.limits = limits or Limits()
        self.token = token  # the Space's own: private downloads; pushes only with push_with_space_token
        self.push_with_space_token = push_with_space_token
        self.peft: PeftModel | None = None  # wraps ``base`` in place once the first adapter arrives
        self.replicated: dict[str, PeftModel] = {}  # layer_replication adapters, each on its own copy of the base
        self._plain = _shared_copy(model)  # the base's module tree before any LoRA layer goes into it
        self.adapters: dict[str, Adapter] = {}
        self.startup_errors: list[str] = []
        self.base_params = sum(numel(p) for p in model.parameters())
        self.base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._lock = RWLock()
        self._work = Path(tempfile.mkdtemp(prefix="peft-trainer-space-"))
        self._count_lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        # Concurrent requests decode together (peft_trainer_space.batcher); without it each runs generate() in its own thread.
        self.batcher = Batcher(self, tokenizer) if batching else None

    @classmethod
    def load(
        cls, base_model: str, adapters: list[tuple[str | None, str]], limits: Limits | None = None,
        token: str | None = None, push_with_space_token: bool = False, batching: bool = True,
    ) -> AdapterEngine:  # fmt: skip
        """Load the base once (on CUDA in bfloat16 where there is a GPU), then each ``(name or None, folder or repo
        id)``; failures are logged, not fatal."""
        from peft_trainer.models import load_model

        log.info("loading base model %s", base_model)
        model, tokenizer = load_model(base_model)
        if torch.cuda.is_available():  # adapters then live beside it: float32 factors on the base's device
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            model = model.to("cuda", dtype=dtype)
            log.info("serving on %s in %s", torch.cuda.get_device_name(), dtype)
        engine = cls(model, tokenizer, base_model, limits, token, push_with_space_token, batching)
        for name, source in adapters:
            try:
                engine.add(source, name, removable=False)
            except Exception as e:  # one bad adapter must not keep the Space from starting
                engine.startup_errors.append(f"{name or source}: {e}")
                log.error("could not load adapter %s: %s", source, e)
        return engine

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        shutil.rmtree(self._work, ignore_errors=True)

    # ---- adapters ---------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def work_dir(self) -> Path:
        """This engine's scratch folder (uploads, exports, trained adapters); removed by ``close()``."""
        return self._work

    def training_base(self) -> torch.nn.Module:
        """A new module tree around the base's own weights, with no adapter in it: what a training in the Space
        injects its LoRA layers into and switches to train mode, without touching the served model."""
        return _shared_copy(self._plain)

    def runs_alone(self, name: str) -> bool:
        """Whether ``name`` adapts parameters (``target_parameters``), whose layers cannot take an adapter per row."""
        config = self.peft.peft_config.get(name) if self.peft is not None else None
        return bool(config is not None and config.target_parameters)

    def _model_of(self, name: str) -> PeftModel | None:
        return self.replicated.get(name, self.peft)

    def add(self, source: str, name: str | None = None, token: str | None = None, removable: bool = True) -> str:
        """Add the adapter in a local folder or a Hub repo (``owner/name``); returns its name."""
        source = source.strip()
        local = Path(source).expanduser()
        if local.is_dir():
            folder = local
        elif is_hub_id(source):
            folder = self._download(source, token)
        else:
            raise FileNotFoundError(f"{source!r} is neither an adapter folder nor a Hub repo id like 'owner/name'")
        return self._add_folder(folder, name or default_name(source), source, removable)

    def add_zip(self, zip_path: str | Path, name: str | None = None) -> str:
        """Add the adapter in an uploaded zip (checked for traversal, links and size before extracting)."""
        dest = Path(tempfile.mkdtemp(prefix="upload-", dir=self._work))
        upload = Path(zip_path).name
        try:
            folder, inner = files.extract_adapter_zip(zip_path, dest, self.limits.zip)
            return self._add_folder(folder, name or inner or default_name(Path(zip_path).stem), upload)
        except (ValueError, OSError) as e:  # name the upload, not this server's temporary folder
            shutil.rmtree(dest, ignore_errors=True)
            raise ValueError(str(e).replace(str(dest / "adapter"), upload)) from None
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    def _download(self, repo_id: str, token: str | None) -> Path:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(repo_id, allow_patterns=list(files.ADAPTER_FILES), token=token or self.token)
        except Exception as e:
            raise ValueError(f"Could not download {repo_id!r} from the Hub ({type(e).__name__}: {e})") from None
        return Path(path)

    def _add_folder(self, folder: Path, name: str, source: str, removable: bool = True) -> str:
        validate_adapter_name(name)
        # Read the files before taking the lock: generation waits only for the in-memory part.
        config, tensors = io.read_adapter(folder)
        check_keeps_base(config, name)
        with self._lock.write():
            self._check_new_name(name)
            if config.layer_replication:
                self.replicated[name] = attach_adapter(_shared_copy(self._plain), name, config, tensors, source)
            else:
                self.peft = attach_adapter(self.peft or self.base, name, config, tensors, source)
            self.adapters[name] = Adapter(name, source, folder, removable)
        log.info("added adapter %s from %s", name, source)
        return name

    def _check_new_name(self, name: str) -> None:
        if name in self.adapters:
            raise ValueError(f"An adapter named {name!r} already exists; choose another name")
        if len(self.adapters) >= self.limits.max_adapters:
            raise ValueError(f"This Space holds at most {self.limits.max_adapters} adapters; delete one first")

    def merge(
        self, adapters: list[str], weights: list[float] | None, name: str, combination_type: str = "svd",
        svd_rank: int | None = None, density: float | None = None,
    ) -> str:  # fmt: skip
        """Create adapter ``name`` as a weighted combination of ``adapters`` (``add_weighted_adapter``)."""
        validate_adapter_name(name)
        if len(adapters) < 2:
            raise ValueError("Pick at least two adapters to merge")
        weights = list(weights) if weights else [1 / len(adapters)] * len(adapters)
        if len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"Give one finite weight per adapter ({len(adapters)} adapters, weights {weights})")
        if combination_type not in COMBINATION_TYPES:
            raise ValueError(
                f"Unknown combination type {combination_type!r}; use one of {', '.join(COMBINATION_TYPES)}"
            )
        with self._lock.write():
            self._check_new_name(name)
            unknown = [a for a in adapters if a not in self.adapters]
            if unknown:
                raise ValueError(f"Unknown adapter(s) {unknown}; available: {self.names()}")
            replicated = [a for a in adapters if a in self.replicated]
            if replicated:
                raise ValueError(
                    f"{replicated} set layer_replication, so they run on layers of their own: merge adapters of "
                    "the unreplicated base"
                )
            try:
                self.peft.add_weighted_adapter(
                    adapters, weights, name, combination_type=combination_type, svd_rank=svd_rank, density=density
                )
            except Exception:
                if name in self.peft.peft_config:
                    self.peft.delete_adapter(name)
                raise
            self.peft.eval()
            source = f"{combination_type} merge of " + ", ".join(f"{a}×{w:g}" for a, w in zip(adapters, weights))
            self.adapters[name] = Adapter(name, source, None, True)
        log.info("merged %s into %s", adapters, name)
        return name

    def delete(self, name: str) -> None:
        """Remove an adapter added while running (startup adapters stay for everyone)."""
        with self._lock.write():
            adapter = self._known(name)
            if not adapter.removable:
                raise ValueError(f"{name!r} was loaded at startup and cannot be deleted")
            if self.replicated.pop(name, None) is None:
                self.peft.delete_adapter(name)
            del self.adapters[name]
        if adapter.folder is not None and self._work in adapter.folder.parents:
            shutil.rmtree(adapter.folder.parent, ignore_errors=True)

    def _known(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise ValueError(f"Unknown adapter {name!r}; available: {self.names() or 'none'}")
        return self.adapters[name]

    # ---- generation -------------------------------------------------------------------------------------------

    def _checked(
        self, adapter: str | None, prompt: str | list[dict[str, str]], sampling: Sampling
    ) -> tuple[str, dict[str, torch.Tensor]]:
        adapter = adapter or BASE
        if adapter != BASE:
            self._known(adapter)
        cap = self.limits.max_new_tokens
        if not isinstance(sampling.max_new_tokens, int) or not 1 <= sampling.max_new_tokens <= cap:
            raise ValueError(f"max_new_tokens={sampling.max_new_tokens} is outside 1..{cap}, this Space's cap")
        if sampling.do_sample and not (sampling.temperature > 0 and 0 < sampling.top_p <= 1 and sampling.top_k >= 0):
            raise ValueError("Sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        if isinstance(prompt, list):  # a conversation: always through the chat template, as in training
            enc = encode_chat(self.tokenizer, check_conversation(prompt), return_tensors="pt")
        elif not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("The prompt is empty: type something to generate from")
        elif sampling.chat_template:  # as in training: the tokenizer's chat template, or the fallback one
            enc = encode_prompts(self.tokenizer, [prompt], return_tensors="pt")
        else:
            enc = self.tokenizer(prompt, return_tensors="pt")
        n = enc["input_ids"].shape[-1]
        if n > self.limits.max_prompt_tokens:
            raise ValueError(f"The prompt is {n} tokens long; this Space accepts {self.limits.max_prompt_tokens}")
        device = next(self.base.parameters()).device
        return adapter, {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    @contextlib.contextmanager
    def _running(self, adapter: str) -> Iterator[None]:
        """Read lock (no adapter changes meanwhile) + the in-flight count, around one generation."""
        with self._lock.read():
            model = self._model_of(adapter)
            if adapter != BASE and (model is None or adapter not in model.peft_config):
                raise ValueError(f"Unknown adapter {adapter!r}")
            with self._count_lock:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                log.info("generate adapter=%s in_flight=%d", adapter, self.in_flight)
            try:
                yield
            finally:
                with self._count_lock:
                    self.in_flight -= 1

    @contextlib.contextmanager
    def _generating(self, adapter: str) -> Iterator[torch.nn.Module]:
        """:meth:`_running` + this thread's adapter choice, around one ``generate()`` (the unbatched path)."""
        with self._running(adapter):
            model = self._model_of(adapter)
            if model is None:
                choice, model = contextlib.nullcontext(), self.base
            else:
                choice = model.use_adapter(adapter)
            with choice, torch.inference_mode():
                yield model

    def stream(
        self, adapter: str | None, prompt: str | list[dict[str, str]], sampling: Sampling | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:  # fmt: skip
        """Generate with ``adapter`` and yield the text so far after each new piece (checks run before it starts).
        ``prompt``: one user message, or a conversation (``{"role", "content"}`` dicts ending with a user turn).

        The tokens come from a worker thread (transformers' ``TextIteratorStreamer``). Context variables are not
        inherited by a new thread, so it runs in a copy of the caller's context, and it enters the adapter choice
        itself: the steps of this generator may run on different threads (Gradio iterates them from a pool), so the
        choice cannot live in the caller across ``yield``.
        """
        sampling = sampling or Sampling()
        adapter, inputs = self._checked(adapter, prompt, sampling)
        if self.batcher is not None and adapter not in self.replicated:
            return self._batched(adapter, inputs, sampling, cancel or threading.Event())
        return self._stream(adapter, inputs, sampling, cancel or threading.Event())

    def _batched(
        self, adapter: str, inputs: dict[str, torch.Tensor], sampling: Sampling, cancel: threading.Event
    ) -> Iterator[str]:
        """The request decodes in the shared batch; the read lock is held until the batcher has let go of it."""
        processors = None  # greedy
        if sampling.do_sample:
            processors = sampling_processors(sampling.temperature, sampling.top_k, sampling.top_p)
        done = threading.Event()
        request = Request(adapter, inputs["input_ids"], sampling.max_new_tokens, processors, (done, cancel))
        with self._running(adapter):
            self.batcher.submit(request)
            text = ""
            try:
                for text in request.texts():
                    yield text
            finally:
                if not request.left:  # the reader went away (a closed tab): leave the batch, then the lock
                    done.set()
                    request.wait_until_left()
        if not text:
            yield text

    def _stream(
        self, adapter: str, inputs: dict[str, torch.Tensor], sampling: Sampling, cancel: threading.Event
    ) -> Iterator[str]:
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        done = threading.Event()
        errors: list[BaseException] = []
        kwargs = {**inputs, **sampling.generate_kwargs(), "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([_Stop(done, cancel)]),
                  "pad_token_id": self.tokenizer.pad_token_id}  # fmt: skip

        def work() -> None:
            try:
                with self._generating(adapter) as model:
                    model.generate(**kwargs)
            except BaseException as e:  # reported to the reader below; end() unblocks it
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
        worker.start()
        text, shown = "", False
        try:
            for piece in streamer:
                text += piece
                if piece:
                    shown = True
                    yield text
        finally:
            done.set()  # a reader that stops early (closed tab) ends the generation at the next token
            worker.join()
        if errors:
            raise errors[0]
        if not shown:
            yield text

    def generate(
        self, adapter: str | None, prompt: str | list[dict[str, str]], sampling: Sampling | None = None
    ) -> str:
        return collections.deque(self.stream(adapter, prompt, sampling), maxlen=1)[0]

    def compare(
        self, left: str | None, right: str | None, prompt: str | list[dict[str, str]],
        sampling: Sampling | None = None, right_prompt: str | list[dict[str, str]] | None = None,
    ) -> Iterator[tuple[str, str]]:  # fmt: skip
        """Generate with two adapters at once, same settings; yields ``(left text, right text)``. ``right_prompt``:
        the right side's own conversation (each side keeps its own answers), else the same prompt."""
        cancel = threading.Event()
        right_prompt = prompt if right_prompt is None else right_prompt
        streams = [self.stream(left, prompt, sampling, cancel), self.stream(right, right_prompt, sampling, cancel)]
        return self._merge_streams(streams, cancel)

    def _merge_streams(self, streams: list[Iterator[str]], cancel: threading.Event) -> Iterator[tuple[str, str]]:
        updates: queue.Queue = queue.Queue()

        def pump(side: int, stream: Iterator[str]) -> None:
            try:
                for text in stream:
                    updates.put((side, text, None))
                updates.put((side, None, None))
            except BaseException as e:
                updates.put((side, None, e))

        pumps = [threading.Thread(target=pump, args=(i, s), daemon=True) for i, s in enumerate(streams)]
        for p in pumps:
            p.start()
        texts, finished = ["", ""], 0
        try:
            while finished < len(pumps):
                side, text, error = updates.get()
                if error is not None:
                    raise error
                if text is None:
                    finished += 1
                    continue
                texts[side] = text
                yield texts[0], texts[1]
        finally:
            cancel.set()
            for p in pumps:
                p.join()

    # ---- card and export ------------------------------------------------------------------------------------

    def card(self, name: str) -> dict[str, Any]:
        """What the adapter card shows: rank, alpha, targets, base model, trainable parameters, loss curve."""
        with self._lock.read():
            adapter, model = self._known(name), self._model_of(name)
            config = model.peft_config[name]
            n = sum(t.numel() for t in model.adapter_tensors(name).values())
        targets = config.target_modules
        return {
            "name": name,
            "source": adapter.source,
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "rank_pattern": dict(config.rank_pattern),
            "target_modules": targets if isinstance(targets, str) else sorted(targets or []),
            "base_model": config.base_model_name_or_path,
            "served_base": self.base_name,
            "trainable_params": n,
            "trainable_percent": 100 * n / (self.base_params + n),  # as training printed it (peft's "trainable%")
            "use_rslora": config.use_rslora,
            "loss": files.loss_history(adapter.folder),
        }

    def _export_dir(self) -> Path:
        for old in self._work.glob("export-*"):  # earlier downloads: Gradio has copied them to its cache by now
            if time.time() - old.stat().st_mtime > 600:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix="export-", dir=self._work))

    def save_adapter(self, name: str, out: Path) -> Path:
        """Write ``out/<name>/`` in PEFT's format (config, safetensors, model card, trainer_state.json if any)."""
        folder = out / name
        with self._lock.read():
            adapter, model = self._known(name), self._model_of(name)
            config = model.config_for_saving(name)
            io.save_adapter(folder, model.adapter_tensors(name), config)
        card.write_card(folder, *card.adapter_card(config.base_model_name_or_path, {name: config}))
        state = files.trainer_state_file(adapter.folder)
        if state is not None:
            shutil.copyfile(state, folder / files.TRAINER_STATE)
        return folder

    def export_adapter(self, name: str) -> Path:
        """A zip holding ``<name>/`` as a PEFT adapter folder."""
        out = self._export_dir()
        folder = self.save_adapter(name, out)
        return files.zip_folder(folder, out / f"{name}.zip")

    def export_merged_model(self, name: str) -> Path:
        """A zip of the full model with ``name`` merged in, made by ``merge_and_unload`` on a copy."""
        limit = self.limits.max_merged_model_bytes
        if self.base_bytes > limit:
            raise ValueError(
                f"The base model is {self.base_bytes / 2**20:.0f} MB; merged downloads are offered up to "
                f"{limit / 2**20:.0f} MB. Download the adapter and merge locally with merge_and_unload()"
            )
        with self._lock.read():
            self._known(name)
            if name in self.replicated:
                raise ValueError(
                    f"{name!r} sets layer_replication, whose copies share their base weights: it cannot be merged "
                    "(as in peft). Download the adapter instead"
                )
            # The copy gets its own adapter state (the served model's holds a context variable, which cannot
            # be copied, and must not be shared).
            clone = copy.deepcopy(self.peft, memo={id(self.peft.adapter_state): AdapterState()})
        merged = clone.merge_and_unload(adapter_names=[name])
        out = self._export_dir()
        folder = out / f"{default_name(self.base_name)}-{name}-merged"
        merged.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        del clone, merged
        return files.zip_folder(folder, out / f"{folder.name}.zip")

    def push(self, name: str, repo_id: str, token: str | None = None, private: bool = True) -> str:
        """Upload the adapter folder to the Hub repo ``repo_id`` with the visitor's ``token``; returns the repo URL.

        The Space's own token is used only when it was started with ``push_with_space_token`` (on a public Space
        anyone could otherwise push with it)."""
        token = (token or "").strip() or (self.token if self.push_with_space_token else None)
        if not token:
            raise ValueError(
                "Pushing needs your own Hub token with write access: sign in with Hugging Face or type a token "
                "(this Space's HF_TOKEN pushes only when it runs with PUSH_WITH_SPACE_TOKEN=1)"
            )
        repo_id = repo_id.strip()
        if not is_hub_id(repo_id):
            raise ValueError(f"{repo_id!r} is not a Hub repo id like 'your-name/my-adapter'")
        folder = self.save_adapter(name, self._export_dir())
        commit = hub.push_folder(folder, repo_id, token, private, message=f"Upload LoRA adapter {name}")
        log.info("pushed adapter %s to %s", name, repo_id)
        return str(commit.repo_url)
