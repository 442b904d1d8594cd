"""Warm models, bounded by LRU: bases (one copy each), adapters loaded onto them by name, and
full fine-tunes as whole models. Only the engine's worker thread touches this (no locks).

A base is held pristine; each adapter family (LoRA, prompt tuning, ...) gets a PeftModel over a
`shared_copy` of it, so peft's in-place injection never duplicates the weights."""

from __future__ import annotations

import gc
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper

from ml.inference import loading, lora_mixed
from ml.inference.loading import BaseKey, ModelInfo

log = logging.getLogger(__name__)


K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self.items[key] = value
        self.items.move_to_end(key)

    def pop(self, key: K) -> V | None:
        return self.items.pop(key, None)

    def overflow(self, pinned: Iterable[K]) -> list[K]:
        """Least recently used keys to drop to get back to capacity, never a pinned one."""
        keep = set(pinned)
        excess = len(self.items) - self.capacity
        return [k for k in self.items if k not in keep][:max(0, excess)]

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, key: object) -> bool:
        return key in self.items


@dataclass
class BaseEntry:
    key: BaseKey
    model: torch.nn.Module
    wrappers: dict[str, PeftModel] = field(default_factory=dict)  # peft_type -> model with adapters
    adapters: set[str] = field(default_factory=set)  # storage keys


@dataclass
class AdapterEntry:
    info: ModelInfo
    name: str
    base: BaseEntry
    prompt: torch.Tensor | None = None  # prompt tuning: the virtual-token embeddings
    mixable: bool = False  # rows of other mixable adapters may share its forward (adapter_names)

    @property
    def wrapper(self) -> PeftModel:
        return self.base.wrappers[str(self.info.peft_type)]


@dataclass
class FullEntry:
    info: ModelInfo
    model: torch.nn.Module


@dataclass
class CacheStats:
    base_loads: int = 0
    adapter_loads: int = 0
    full_loads: int = 0
    evictions: int = 0


def adapter_name(storage_key: str) -> str:
    return "a" + hashlib.sha1(storage_key.encode()).hexdigest()[:16]


class ModelCache:
    def __init__(self, max_bases: int, max_adapters: int, max_full: int, device: torch.device,
                 base_dir: Callable[[ModelInfo], Path]) -> None:
        self.bases: LRU[BaseKey, BaseEntry] = LRU(max_bases)
        self.adapters: LRU[str, AdapterEntry] = LRU(max_adapters)
        self.full: LRU[str, FullEntry] = LRU(max_full)
        self.device = device
        self.base_dir = base_dir
        self.stats = CacheStats()

    # --- lookups (load on miss) ---

    def adapter(self, info: ModelInfo, pinned: set[str], pad_id: int | None = None) -> AdapterEntry:
        entry = self.adapters.get(info.storage_key)
        if entry is not None and entry.base.key in self.bases:
            self.bases.get(entry.base.key)
            return entry
        base = self._base(info, {info.base_key} | self._pinned_bases(pinned), pad_id)
        entry = self._load_adapter(info, base)
        self.adapters.put(info.storage_key, entry)
        for key in self.adapters.overflow(pinned | {info.storage_key}):
            self.evict_adapter(key)
        return entry

    def full_model(self, info: ModelInfo, pinned: set[str]) -> FullEntry:
        if info.is_catalog_base:  # the pristine copy its adapters load onto: one copy in memory
            base = self._base(info, {info.base_key} | self._pinned_bases(pinned), None)
            return FullEntry(info, base.model)
        entry = self.full.get(info.storage_key)
        if entry is None:
            entry = FullEntry(info, loading.load_full(info, self.device))
            self.stats.full_loads += 1
            self.full.put(info.storage_key, entry)
            for key in self.full.overflow(pinned | {info.storage_key}):
                self._drop_full(key)
        return entry

    def _pinned_bases(self, pinned: set[str]) -> set[BaseKey]:
        return {e.base.key for k in pinned if (e := self.adapters.items.get(k)) is not None}

    def _base(self, info: ModelInfo, pinned: set[BaseKey], pad_id: int | None) -> BaseEntry:
        entry = self.bases.get(info.base_key)
        if entry is None:
            model = loading.load_base(self.base_dir(info), info, self.device, pad_id)
            entry = BaseEntry(info.base_key, model)
            self.stats.base_loads += 1
            self.bases.put(info.base_key, entry)
            for key in self.bases.overflow(pinned):
                self._drop_base(key)
        return entry

    def _load_adapter(self, info: ModelInfo, base: BaseEntry) -> AdapterEntry:
        name = adapter_name(info.storage_key)
        family = str(info.peft_type)
        wrapper = base.wrappers.get(family)
        if wrapper is None:
            twin = loading.shared_copy(base.model)
            wrapper = PeftModel.from_pretrained(twin, info.path, adapter_name=name, is_trainable=False)
            wrapper.eval()
            base.wrappers[family] = wrapper
        elif name not in wrapper.peft_config:
            wrapper.load_adapter(info.path, adapter_name=name, is_trainable=False)
            wrapper.eval()
        if info.mixable:
            lora_mixed.install(wrapper)
        base.adapters.add(info.storage_key)
        self.stats.adapter_loads += 1
        entry = AdapterEntry(info, name, base, mixable=info.mixable and _heads_mixable(wrapper, name))
        if info.is_prompt:
            entry.prompt = _prompt_embeddings(wrapper, name)
        return entry

    # --- eviction ---

    def evict(self, storage_key: str) -> bool:
        """Drop a model (adapter or full) from memory; True when it was loaded."""
        if storage_key in self.adapters:
            self.evict_adapter(storage_key)
            return True
        if storage_key in self.full:
            self._drop_full(storage_key)
            return True
        return False

    def evict_adapter(self, storage_key: str) -> None:
        entry = self.adapters.pop(storage_key)
        if entry is None:
            return
        base = entry.base
        base.adapters.discard(storage_key)
        family = str(entry.info.peft_type)
        wrapper = base.wrappers.get(family)
        if wrapper is not None and entry.name in wrapper.peft_config:
            lora_mixed.clear(wrapper)
            wrapper.delete_adapter(entry.name)
            if not wrapper.peft_config:
                del base.wrappers[family]  # last one: drop the module tree too
        self.stats.evictions += 1
        _free_memory()

    def _drop_base(self, key: BaseKey) -> None:
        entry = self.bases.pop(key)
        if entry is None:
            return
        for storage_key in list(entry.adapters):
            self.adapters.pop(storage_key)
        entry.wrappers.clear()
        self.stats.evictions += 1
        _free_memory()

    def _drop_full(self, key: str) -> None:
        if self.full.pop(key) is not None:
            self.stats.evictions += 1
            _free_memory()

    def snapshot(self) -> dict[str, object]:
        return {
            "bases": [f"{k.base_model}/{k.task}/{k.num_labels}" for k in self.bases.items],
            "adapters": list(self.adapters.items), "full_models": list(self.full.items),
            "base_loads": self.stats.base_loads, "adapter_loads": self.stats.adapter_loads,
            "full_loads": self.stats.full_loads, "evictions": self.stats.evictions,
        }


def _heads_mixable(wrapper: PeftModel, name: str) -> bool:
    """peft mixes modules_to_save copies per row only for plain layers (a classifier Linear, not
    e.g. BERT's MLM transform block)."""
    plain = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return all(isinstance(m.original_module, plain) for m in wrapper.modules()
               if isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save)


def _prompt_embeddings(wrapper: PeftModel, name: str) -> torch.Tensor:
    previous = wrapper.active_adapter
    wrapper.set_adapter(name)
    try:
        with torch.inference_mode():
            return wrapper.get_prompt(batch_size=1)[0].detach().clone()
    finally:
        if previous in wrapper.peft_config:
            wrapper.set_adapter(previous)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
