"""Decode steps of a model on a CUDA GPU, replayed from one captured CUDA graph.

A decode step of a 48-layer MoE model is hundreds of small kernel launches and as many
Python calls, with the CPU experts' work between them; launched one by one they cost
more than the GPU's work. Captured once, a step is one `replay()`: the GPU runs the
launches back to back, and the routed experts on the CPU engine run inside the graph
as host functions in stream order (tandem.ops.experts_cpu).

What is captured is the model's own forward for one token:
`model(inputs_embeds=E, position_ids=P, attention_mask=M, <cache>=kv, logits_to_keep=1)`.
E (the token's embedding) and P (its position) are fixed GPU tensors each step fills
before the replay. Where the token table is on the GPU (its lookup reads no ids on the
host), the graph holds the lookup too, from a fixed token tensor, and ends by writing the
argmax of its logits there: greedy steps then chain on the GPU alone, and
`greedy_tokens` keeps the next step queued while the host handles the last token (its
text, stop checks, the stream to a client); $TANDEM_GREEDY_CHAIN=0 turns that off. A
table in CPU RAM keeps the lookup outside.
The cache's layers (tandem.engine.kv_cache.GrowingLayer) write the new key and value
at P and give attention their whole buffers; M, computed in the graph from P, hides the
rows not yet written. The buffers must not move, so the cache reserves room for the
whole generation first; should they move anyway (a longer generation on the same
cache), the step is captured again. A later generation's new cache moves onto the
buffers the graph was captured on (its prompt's rows copied there) when they are big
enough, so that it replays the same graph without a warm-up step or a capture; a cache
that still uses them gets copies first.

A step takes this path when the model runs on a CUDA device, every cache layer is a
full-attention GrowingLayer (no sliding windows: one mask serves every layer), no
operator says it cannot be captured (`capturable` false: experts that read their routed
ids on the host, such as QuantExperts computing from the mapped file) and the forward
takes those arguments; $TANDEM_CUDA_GRAPH=0 turns it off. The first step of a
capture runs eagerly (it warms up every kernel) and counts as a step. Should the
capture fail (an operator that waits for the GPU), the model decodes eagerly from then
on, with a one-line warning.
"""

from __future__ import annotations

import inspect
import sys
import time
import weakref
from collections.abc import Iterator

import torch

from tandem.engine.kv_cache import GrowingLayer, same_kind
from tandem.engine.model_io import input_device
from tandem.env_switches import switch

GRAPH_ENV = "TANDEM_CUDA_GRAPH"
CHAIN_ENV = "TANDEM_GREEDY_CHAIN"  # 0: greedy steps wait for the host's pick, one by one


def graphs_enabled() -> bool:
    return switch(GRAPH_ENV, default=True)


class GraphDecode:
    """The captured decode step of one model; `for_model` keeps one per model."""

    def __init__(self, model: torch.nn.Module, cache_kwarg: str):
        self.model = model
        self.cache_kwarg = cache_kwarg
        self.device = next(p.device for p in model.parameters() if p.device.type == "cuda")
        self.broken: str | None = None  # why capture failed; eager from then on
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None  # the buffers the graph was captured on, and their size
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # those buffers, per layer
        self.owner: weakref.ref | None = None  # the cache using them
        self.logits: torch.Tensor | None = None
        self.embeds: torch.Tensor | None = None
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.ids_device = input_device(model)
        self.lookup_in_graph = looks_up_on(model.get_input_embeddings(), self.device)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # the lookup's id
        # greedy_tokens: each queued step's pick, copied to the host, and the event it waits on
        self.picked = torch.zeros(2, dtype=torch.long, pin_memory=True)
        self.picked_events = [torch.cuda.Event(blocking=True) for _ in range(2)]
        self.done = torch.cuda.Event(blocking=True)
        self.captures = 0  # for tests and benchmarks
        self.replays = 0
        self.chained = 0  # replays queued by greedy_tokens before the host had the token
        self.capture_seconds = 0.0  # spent capturing (a new cache is a new capture)
        params = inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, cache_kwarg: str) -> GraphDecode | None:
        """The model's captured step, or None where this path does not apply."""
        if not graphs_enabled() or not torch.cuda.is_available():
            return None
        found = getattr(model, "_tandem_graph_decode", None)
        if found is not None:
            return found if found.broken is None else None
        if not any(p.device.type == "cuda" for p in model.parameters()):
            return None
        if any(getattr(m, "capturable", True) is False for m in model.modules()):
            return None  # an operator that waits for the GPU (experts reading their ids on the host)
        types = getattr(model.config, "layer_types", None) or []
        if any(t != "full_attention" for t in types) or getattr(model.config, "sliding_window", None):
            return None
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return None
        if not {"inputs_embeds", "position_ids", "attention_mask", cache_kwarg} <= set(params):
            return None
        decoder = cls(model, cache_kwarg)
        model._tandem_graph_decode = decoder
        return decoder

    def fits(self, kv) -> bool:
        layers = getattr(kv, "layers", None)
        if not layers or any(type(layer) is not GrowingLayer for layer in layers):
            return False
        first = layers[0]
        return all(
            layer._k is not None and layer._k.device == self.device and layer.length == first.length
            for layer in layers
        )

    def reserve(self, kv, end: int) -> None:
        """Room for `end` positions in every layer, so that steps up to there keep one graph:
        on the buffers the graph was captured on where they are big enough (a new cache of
        a later generation then replays it at once), else in the cache's own."""
        if not self._adopt(kv, end):
            for layer in kv.layers:
                layer.reserve(end)

    def _adopt(self, kv, end: int) -> bool:
        """Move kv's rows onto the captured graph's buffers, if they fit it. A cache that
        owned them before and is still alive gets copies of its own."""
        if self.graph is None or not self.buffers or len(kv.layers) != len(self.buffers):
            return False
        pairs = list(zip(kv.layers, self.buffers, strict=True))
        if all(layer._k is k for layer, (k, _) in pairs):
            return end <= self.buffers[0][0].shape[2]
        if not all(end <= k.shape[2] and same_kind(k, v, layer._k, layer._v) for layer, (k, v) in pairs):
            return False
        owner = self.owner() if self.owner is not None else None
        if owner is not None and owner is not kv:
            for layer in owner.layers:
                if any(layer._k is k for k, _ in self.buffers):
                    layer._k, layer._v = layer._k.clone(), layer._v.clone()
        for layer, (k, v) in pairs:
            n = layer.length
            k[:, :, :n].copy_(layer._k[:, :, :n])
            v[:, :, :n].copy_(layer._v[:, :, :n])
            layer._k, layer._v = k, v
        self.owner = weakref.ref(kv)
        return True

    def ready(self, kv, end: int) -> bool:
        """Whether greedy_tokens can run kv's steps up to position `end` on the captured graph."""
        if self.graph is None or self.broken is not None or not self.lookup_in_graph:
            return False
        if not switch(CHAIN_ENV, default=True):
            return False
        key = buffers_key(kv)
        return key == self.key and end <= key[-1]

    def step(self, kv, token: int) -> torch.Tensor:
        """Feed `token` at the cache's next position; its logits [V]."""
        layers = kv.layers
        pos = layers[0].length
        if any(layer._k.shape[2] <= pos for layer in layers):  # past the generation's reserved room
            self.reserve(kv, pos + 1)
        key = buffers_key(kv)
        embeds = None
        if self.lookup_in_graph:
            self.token.fill_(token)
        else:
            ids = torch.tensor([[token]], device=self.ids_device)
            embeds = self.model.get_input_embeddings()(ids).to(self.device)
        self.position.fill_(pos)
        if self.graph is not None and key == self.key:
            if embeds is not None:
                self.embeds.copy_(embeds)
            self.graph.replay()
            self.replays += 1
            logits = self.logits
            # Wait asleep: a spinning wait (CUDA's default) takes a core from the engine's workers.
            self.done.record()
            self.done.synchronize()
        else:
            logits = self._run_and_capture(kv, embeds, key)
        for layer in layers:
            layer.advance()
        return logits[0, -1]

    def greedy_tokens(self, kv, token: int, limit: int) -> Iterator[int]:
        """Feed `token`, then each token the graph picks (the argmax of the logits), `limit`
        steps at most; yields the picks in order. One step is queued ahead of the pick yielded,
        so the host's work on it overlaps the GPU's and the engine's. A step queued but never
        yielded (the caller stopped) is taken back out of the cache's length, so the cache holds
        what it would after `step`: every fed token but the last pick. Needs `ready(kv, end)`."""
        layers = kv.layers
        self.token.fill_(token)
        launched = yielded = 0
        try:
            while yielded < limit:
                while launched < limit and launched - yielded < 2:
                    slot = launched % 2  # reused only once its pick was read
                    self.position.fill_(layers[0].length)
                    self.graph.replay()
                    self.picked[slot : slot + 1].copy_(self.token.view(1), non_blocking=True)
                    self.picked_events[slot].record()
                    self.replays += 1
                    self.chained += 1
                    launched += 1
                    for layer in layers:
                        layer.advance()
                slot = yielded % 2
                self.picked_events[slot].synchronize()  # asleep, as in step
                yielded += 1
                yield int(self.picked[slot])
        finally:
            for layer in layers:
                layer.crop(yielded - launched)

    def _forward(self, kv) -> torch.Tensor:
        layers = kv.layers
        capacity = layers[0]._k.shape[2]
        keys = torch.arange(capacity, device=self.device)
        mask = (keys <= self.position).view(1, 1, 1, capacity)
        if self.lookup_in_graph:
            embeds = self.model.get_input_embeddings()(self.token).to(self.device)
        else:
            embeds = self.embeds
        for layer in layers:
            layer.graph_position = self.position
        try:
            out = self.model(
                inputs_embeds=embeds,
                position_ids=self.position.view(1, 1),
                attention_mask=mask,
                use_cache=True,
                **{self.cache_kwarg: kv},
                **self.extra,
            )
        finally:
            for layer in layers:
                layer.graph_position = None
        if self.lookup_in_graph:  # the greedy pick, the next step's input
            self.token.copy_(torch.argmax(out.logits[0, -1].float()).view(1, 1))
        return out.logits

    def _run_and_capture(self, kv, embeds: torch.Tensor | None, key: tuple) -> torch.Tensor:
        """This step eagerly (the warm-up), then the capture of the next ones."""
        self.graph = self.key = None
        self.buffers, self.owner = [], None
        self.embeds = None if embeds is None else embeds.detach().clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            logits = self._forward(kv).clone()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        started = time.perf_counter()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._forward(kv)
        except Exception as error:
            self.broken = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"tandem: warning: decode steps run without a CUDA graph ({self.broken})", file=sys.stderr)
            return logits
        self.graph, self.key = graph, key
        self.buffers = [(layer._k, layer._v) for layer in kv.layers]
        self.owner = weakref.ref(kv)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - started
        return logits


def buffers_key(kv) -> tuple:
    """The cache's buffers and their room: a captured graph replays only on the same ones."""
    layers = kv.layers
    return (*(layer._k.data_ptr() for layer in layers), layers[0]._k.shape[2])


def looks_up_on(embedding: torch.nn.Module | None, device: torch.device) -> bool:
    """Whether the token table's lookup runs on `device` from ids there, reading nothing on
    the host (a graph can hold it)."""
    if embedding is None:
        return False
    if hasattr(embedding, "ids_device"):  # tandem's QuantEmbedding: None for a table in CPU RAM
        return embedding.ids_device == device
    tensors = [*embedding.parameters(), *embedding.buffers()]
    return isinstance(embedding, torch.nn.Embedding) and all(t.device == device for t in tensors)
