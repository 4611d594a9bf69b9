"""The segmentation engine: one RGB frame in, a class map and a confidence map at the frame's resolution out.

The engine knows no model: everything that differs between model families (loading, the network input, what a merge
rate sets, the forward, the outputs) is its family object's (``inference/families/``, picked from the model name by
``families/registry.py``); the engine adds what every family shares: the precision ladder, the backends, the lock
between the rate setters and the inferring thread, timing per stage and the result. The thread count is the
caller's (the node's thread governor sets it between frames): the engine never switches it per frame.
Pre- and post-processing of frames: ``families/frames.py`` (``to_tensor``, ``logits_to_maps``, re-exported here).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from segmerge_ros.merging.segformerpp import MAX_MERGE_RATE, MergeConfig, preset, scaled_size
from segmerge_ros.inference.backends.auto import AUTO, BackendChoice, choice_fields, choose_backend
from segmerge_ros.inference.backends.base import Backend
from segmerge_ros.inference.backends.cache import default_cache_dir
from segmerge_ros.inference.backends.registry import auto_candidates, make_backend, split_device
from segmerge_ros.inference.families.base import ModelFamily, OutputOptions
from segmerge_ros.inference.families.frames import logits_to_maps, network_config, normalise, to_tensor
from segmerge_ros.inference.families.registry import family_for
from segmerge_ros.inference.postprocess.upsample import warm_upsampled_argmax
from segmerge_ros.inference.ladder import Step, build_ladder, precision_plan, step_for_rate, with_precision
from segmerge_ros.inference.memory import return_freed_memory
from segmerge_ros.inference.postprocess.mask2former import DETECTIONS_PER_IMAGE, InstanceMap, PanopticSegmentation

__all__ = ["SegmentationEngine", "SegmentationResult", "logits_to_maps", "network_config", "normalise",
           "parse_size", "to_tensor"]

LOG = logging.getLogger(__name__)

# budget mode skips a step that is not at least this much faster than every step with less merging (it would cost
# accuracy and buy nothing: eager bf16 at 576x768 measured head2+hq 74.7 ms against head2's 67.4, docs/benchmarks.md 14)
DOMINANCE_MARGIN = 0.05
# compiled rungs of a frame size unseen this long are freed (engine.infer: a camera changed size or went away)
STALE_SIZE_S = 60.0
# precision auto keeps the half precision when its arg-max agrees with fp32 on at least this share of a real frame
AUTO_MIN_AGREEMENT = 0.995


@dataclass
class SegmentationResult:
    class_map: np.ndarray  # (H, W) uint8 class ids at the input resolution
    confidence: np.ndarray | None  # (H, W) uint8, max softmax probability * 255; None when not asked for
    inference_ms: float  # pre-processing + network + post-processing
    merge_rate: float
    merge_name: str
    instances: InstanceMap | None = None  # Mask2Former: the instance id map (mono16) and each id's class and score
    panoptic: PanopticSegmentation | None = None  # Mask2Former with panoptic=True: segment map and segments
    preprocess_ms: float = math.nan   # resize and normalise into the network's input
    network_ms: float = math.nan      # the backend call alone (what the merge rate and the thread count act on)
    postprocess_ms: float = math.nan  # upsampled arg-max, confidence, instances


def parse_size(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """"512x1024" (height x width) -> (512, 1024); "" or None -> None (the frame's own size)."""
    if text is None or text == "":
        return None
    if isinstance(text, (tuple, list)):
        height, width = (int(v) for v in text)
    else:
        parts = str(text).lower().replace(",", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must look like HEIGHTxWIDTH (e.g. 512x1024), got {text!r}")
        height, width = (int(p) for p in parts)
    if height < 32 or width < 32:
        raise ValueError(f"size {height}x{width} is too small (at least 32x32)")
    return height, width


class SegmentationEngine:
    """Frame in, result out; the merge configuration can change between any two calls (thread-safe).

    ``model`` names a model of one family (``inference/families/``): a SegFormer size (``segformer-b0`` .. ``b5``:
    Segformer++ merging, the merge-rate ladder, presets), a plain ViT
    (``<segmenter|algm|clustvit|dovit>-vit-<t|s|b|l>[-linear|-mask]``: ``merge_rate`` maps onto the method's own
    control) or a Mask2Former (``mask2former-<backbone>[-proscale]``: ``merge_rate`` maps onto the encoder's
    coarse-layer knob; the result also holds instances, thresholded at ``instance_score_threshold``, at most
    ``max_instances``, and with ``panoptic=True`` the panoptic segmentation). ``family`` is that family's object.

    ``precision``: fp32, bf16, fp16, or auto (fp32 at merge rate 0, the half precision from the first faster step
    on, kept only if it agrees with fp32 on the first real frame: ``inference/ladder.py``). With ``backend="openvino"``
    ``device`` may name an OpenVINO device (CPU, GPU, NPU, AUTO).
    """

    def __init__(
        self,
        model: str = "segformer-b0",
        weights: str | None = None,
        device: str = "cpu",
        backend: str = "eager",
        input_size: str | tuple[int, int] | None = None,
        preset: str = "none",
        upsample: str = "logits",
        num_classes: int = 19,
        precision: str = "fp32",
        cache_dir: str | None = None,
        warm: bool = True,
        instance_score_threshold: float = 0.5,
        max_instances: int = DETECTIONS_PER_IMAGE,
        panoptic: bool = False,
        cache_max_mb: float | None = None,
    ):
        device, openvino_device = split_device(device, backend)
        self.device = _pick_device(device)
        self.input_size = parse_size(input_size)
        self.upsample = upsample
        self.randomly_initialised = not weights
        options = OutputOptions(float(instance_score_threshold), int(max_instances), bool(panoptic))
        self.family: ModelFamily = family_for(model).load(model, weights, num_classes=num_classes,
                                                          device=self.device, options=options)
        self.model = self.family.model
        self.labels = self.family.labels
        self.model.to(self.device)
        if self.device.type == "cpu":
            warm_upsampled_argmax()  # compiled (or loaded from numba's cache) now, not on the first frame
        self._lock = threading.Lock()
        compiled = self.family.compiled_backends  # none for content-dependent token counts (ALGM, ClustViT, DoViT)
        if backend not in ("eager", AUTO) and backend not in compiled:
            LOG.warning("backend %r does not serve %s models (%s); running %s eagerly", backend, self.family.name,
                        f"compiled backends: {', '.join(compiled)}" if compiled else "no compiled path",
                        self.family.name)
            backend = "eager"
        self._precision, self._cache_dir, self._model_name = precision, cache_dir, model
        self._cache_max_mb = cache_max_mb
        self._openvino_device = openvino_device
        self._compiled_limit = (0, True)  # (rungs kept per precision, count bound on) of limit_compiled; 0: all
        self.backend_choice: BackendChoice | None = None  # what backend "auto" chose, why, from which figures
        candidates = ([name for name in auto_candidates(self.device, openvino_device)
                       if name == "eager" or name in compiled] or ["eager"]) if backend == AUTO else [backend]
        self._auto_candidates = candidates if len(candidates) > 1 else []  # timed on the first frame (or at start)
        if backend == AUTO and not self._auto_candidates:
            self.backend_choice = BackendChoice(candidates[0], "the only candidate here" if compiled else
                                                f"{self.family.name} models run eagerly")
            LOG.info("backend auto: %s (%s)", candidates[0], self.backend_choice.reason)
        self.precision_plan, self.ladder, self._backends = self._make_ladder(candidates[0])
        self._calibration_pending = self.precision_plan == "auto"
        self.backend = self._backends[self.ladder[0].precision].name  # the backend in use (eager after a fallback)
        self._step = self.ladder[0]
        self._merge: MergeConfig = self._step.config
        self._merge_rate = 0.0
        self.set_preset(preset)
        self._warm = warm
        self._warmed_sizes: set[tuple[int, int]] = set()
        self._size_last_seen: dict[tuple[int, int], float] = {}  # frame sizes with compiled rungs -> last frame
        self._last_size: tuple[int, int] | None = None  # the last frame's size
        self.step_times: dict[tuple[int, int], dict[float, float]] = {}  # size -> network ms per step rate
        self._warm_on_new_sizes = self.backend != "eager" and warm and self.input_size is None
        if self._auto_candidates and warm and self.input_size is not None:
            self.choose_backend(self.input_size)
        elif self.backend != "eager" and warm:
            if self.input_size is None:
                LOG.warning("backend %s without a fixed input_size: the first frame of each new size prepares "
                            "every rung for it (and stalls); set input_size to prepare them at start", self.backend)
            else:
                self.warm()

    @property
    def backend_pending(self) -> bool:
        """Whether backend auto still has to time its candidates (on the first camera frame)."""
        return bool(self._auto_candidates)

    def _make_ladder(self, backend: str) -> tuple[str, tuple[Step, ...], dict[str, Backend]]:
        """(precision plan, ladder, one backend per precision the ladder uses) for backend ``backend``."""
        openvino_device = self._openvino_device if backend == "openvino" else None
        plan, half = precision_plan(self._precision, self.device, openvino_device)
        ladder = build_ladder(self.family.rungs(backend), plan, half)
        backends = {
            name: make_backend(backend, self.family.network, self.device, precision=name, input_size=self.input_size,
                               ladder_configs=[network_config(step.config) for step in ladder if step.precision == name],
                               cache_dir=self._cache_dir, model_name=self._model_name, log=LOG,
                               openvino_device=self._openvino_device, cache_max_mb=self._cache_max_mb)
            for name in dict.fromkeys(step.precision for step in ladder)
        }
        for made in backends.values():
            made.limit_compiled(*self._compiled_limit)
        return plan, ladder, backends

    def choose_backend(self, size: tuple[int, int]) -> BackendChoice:
        """``backend: auto``: time every candidate on the ladder's exact and fastest steps at ``size`` (or reuse the
        choice remembered for this CPU and size), switch to the fastest and prepare its rungs. Runs by itself on
        the first frame when no input_size was given; later sizes keep the choice."""
        candidates, self._auto_candidates = self._auto_candidates, []
        made: dict[str, tuple[str, tuple[Step, ...], dict[str, Backend]]] = {
            self.backend: (self.precision_plan, self.ladder, self._backends)}

        def measure(name: str) -> list[float]:
            if name not in made:
                made[name] = self._make_ladder(name)
            _, ladder, backends = made[name]
            times = [self._time_step(step, backends[step.precision], size) for step in (ladder[0], ladder[-1])]
            fallen = [f"{backend.name}" + (f" ({', '.join(backend.eager_rungs)} eagerly)" if getattr(backend, "eager_rungs", []) else "")
                      for backend in backends.values() if backend.name != name or getattr(backend, "eager_rungs", [])]
            if fallen:  # a silent fallback to eager: these figures are not the candidate's
                raise RuntimeError(f"{name} fell back: {', '.join(fallen)}")
            return times

        fields = choice_fields(self._model_name, size, self._precision,
                               **{f"{name}_version": _version(name) for name in candidates})
        start = time.perf_counter()
        choice = choose_backend(candidates, measure, fields, self._cache_dir or default_cache_dir(), LOG)
        LOG.info("backend auto at %dx%d: %s%s", *size, choice.reason,
                 "" if choice.remembered else f" (timed in {time.perf_counter() - start:.1f} s)")
        self.backend_choice = choice
        if choice.name != self.backend:
            plan, ladder, backends = made.get(choice.name) or self._make_ladder(choice.name)
            with self._lock:
                self.precision_plan, self.ladder, self._backends = plan, ladder, backends
                self.step_times = {}
                self.backend = backends[ladder[0].precision].name
                self._step = self._step_for(self._merge_rate)
                self._merge = self._step.config
            self._calibration_pending = plan == "auto"
            self._warm_on_new_sizes = self._warm and self.input_size is None
        made.clear()  # the candidates not chosen: their compiled rungs are freed with them
        if self.backend != "eager" and self._warm:
            self.warm(size=size)
        return choice

    # --- what budget mode may choose ------------------------------------------------------------------------------

    @property
    def needs_step_times(self) -> bool:
        """Whether the ladder's steps have not been timed at the last frame's size yet (SegFormer ladders only)."""
        return (self.family.merge_configs and self._last_size is not None
                and tuple(self.input_size or self._last_size) not in self.step_times)

    def time_steps(self, size: tuple[int, int] | None = None, repeats: int = 3) -> dict[float, float]:
        """Time every step's network at ``size`` (default: the last frame's; input_size when fixed), for budget
        mode's choice among them (``budget_rates``); a second or two once per size."""
        size = tuple(self.input_size or size or self._last_size)
        # Round robin, keeping each step's fastest round: a load that comes or goes while the steps are timed (budget
        # mode is often switched on under load) slows every step alike instead of the ones timed first, and other
        # processes only ever add time. Timed one after the other, a 4-s burst of two busy processes made head2
        # (0.15) and head2+2x2 (0.3) look slower than rate 0.05 and pruned them for good (2026-12-08).
        times = {step.rate: math.inf for step in self.ladder}
        runnable = list(self.ladder)
        for _ in range(repeats):
            for step in list(runnable):
                try:
                    elapsed = self._time_step(step, self._backends[step.precision], size, 1)
                except Exception as error:  # e.g. a frame too small for the fastest step: never a candidate
                    LOG.warning("budget mode: step %s cannot run at %dx%d (%s: %s)", step.name, *size,
                                type(error).__name__, error)
                    runnable.remove(step)
                    continue
                times[step.rate] = min(times[step.rate], elapsed)
        with self._lock:  # the diagnostics timer reads them from another thread
            self.step_times[size] = times
        skipped = sorted(set(times) - set(undominated(times)))
        if skipped:
            LOG.info("budget mode skips step(s) %s at %dx%d: no faster than a step with less merging (%s ms)",
                     ", ".join(f"{rate:g}" for rate in skipped), *size,
                     ", ".join(f"{rate:g}: {ms:.1f}" for rate, ms in sorted(times.items())))
        return times

    def budget_rates(self) -> list[float]:
        """The rates budget mode may choose: the ladder's, less those measured to be no faster than a step with less
        merging (``DOMINANCE_MARGIN``) at every frame size timed (one controller serves every camera: its levels
        change only when a new size is timed). A manual merge_rate still runs any step."""
        rates = self.ladder_rates
        with self._lock:
            measured = list(self.step_times.values())
        if not measured or not self.family.merge_configs:
            return rates
        kept = set().union(*(undominated(times) for times in measured))
        return [rate for rate in rates if rate in kept]

    def ladder_description(self) -> str:
        """"0 none, 0.05 none@bf16, ..." with the steps budget mode skips marked (diagnostics)."""
        budget = set(self.budget_rates())
        return ", ".join(f"{step.rate:g} {step.name}" + ("" if step.rate in budget else " [skipped by budget mode]")
                         for step in self.ladder)

    def _step_for(self, rate: float) -> Step:
        """The step the current setting runs on this ladder (a preset keeps its configuration)."""
        if math.isfinite(rate):
            return self.family.merge_step(rate, step_for_rate(rate, self.ladder))
        return Step(rate, self._merge, self.ladder[-1].precision)

    def _time_step(self, step: Step, backend: Backend, size: tuple[int, int], repeats: int = 3) -> float:
        """Median ms of the network alone on ``step`` at ``size`` through ``backend``, after one untimed call
        (compilation, first-touch allocations)."""
        pixels = self.family.network_input(np.zeros((*size, 3), dtype=np.uint8), step.config, tuple(size))
        times = []
        for index in range(repeats + 1):
            start = time.perf_counter()
            self.family.forward(pixels, step.config, step.precision, step.rate, backend)
            if index:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    @property
    def merge_rate(self) -> float:
        return self._merge_rate

    @property
    def ladder_rates(self) -> list[float]:
        """The merge rates at which the configuration changes (SegFormer's steps, Mask2Former's knob settings; ViT
        methods are continuous: none)."""
        return self.family.ladder_rates(self.ladder)

    @property
    def merge_config(self) -> MergeConfig:
        return self._merge

    @property
    def precision(self) -> str:
        """The precision the next frame is computed in."""
        return self._step.precision

    def warm(self, rates: Iterable[float] | None = None, size: tuple[int, int] | None = None) -> list[Step]:
        """Prepare every step (or those ``rates`` select) and the current preset at ``input_size`` (or the frame
        ``size`` when there is none), so that no rate change stalls a frame; returns the steps prepared."""
        size = self.input_size or size
        if size is None:
            raise ValueError("warm() needs the engine's input_size or a frame size")
        self._warmed_sizes.add(tuple(size))
        steps = list(self.ladder) if rates is None else [step_for_rate(rate, self.ladder) for rate in rates]
        if rates is None and self._step not in self.ladder:  # a preset in use
            steps.append(self._step)
        if self._calibration_pending:  # auto compares these two on the first frame
            steps += self.ladder[:2]
        # the current step last: with limit_compiled, the rungs prepared last are the ones that stay compiled
        steps = [step for step in dict.fromkeys(steps) if step != self._step] + [self._step] * (self._step in steps)
        for config, precision in [(step.config, step.precision) for step in steps]:
            self._backends[precision].warm(
                [network_config(config)], input_shape=scaled_size(*size, config.input_scale)
            )
        return steps

    def free_sizes_unseen_for(self, seconds: float, now: float | None = None) -> list[tuple[int, int]]:
        """Free the compiled rungs of frame sizes no frame has had for ``seconds`` (a camera switched to another
        resolution, or gone): each size's ladder holds hundreds of MB with OpenVINO. A size that comes back is
        prepared again. Returns the sizes freed (each logged)."""
        now = time.monotonic() if now is None else now
        stale = [size for size, seen in self._size_last_seen.items() if now - seen >= seconds]
        live = set().union(*(self._network_sizes(size) for size, seen in self._size_last_seen.items()
                             if now - seen < seconds))
        for size in stale:
            shapes = self._network_sizes(size) - live  # a scaled input of a stale size may be a live size's own
            for backend in self._backends.values():
                backend.forget(shapes)
            self._warmed_sizes.discard(size)
            unseen_s = now - self._size_last_seen.pop(size)
            LOG.info("backend %s: freed the rungs compiled for %dx%d frames (none for %.0f s)", self.backend, *size,
                     unseen_s)
        if stale:
            return_freed_memory()
        return stale

    def _network_sizes(self, size: tuple[int, int]) -> set[tuple[int, int]]:
        """The network input sizes (H, W) the ladder and the current preset use for frames of ``size``."""
        scales = {step.config.input_scale for step in self.ladder} | {self._merge.input_scale}
        return {tuple(scaled_size(*size, scale)) for scale in scales}

    @property
    def runs_on_cpu_threads(self) -> bool:
        """Whether the network's time depends on the CPU thread count (the thread governor's actuator)."""
        return any(backend.runs_on_cpu_threads for backend in self._backends.values())

    def free_other_thread_counts(self) -> int:
        """Free the rungs compiled for thread counts not in use (the thread governor's earlier choices or probes);
        returns how many went (logged when any did)."""
        with self._lock:
            gone = sum(backend.free_other_thread_counts() for backend in self._backends.values())
        if gone:
            return_freed_memory()
            LOG.info("backend %s: freed %d rung(s) compiled for thread counts no longer in use", self.backend, gone)
        return gone

    def limit_compiled(self, limit: int, count: bool = True) -> None:
        """Keep at most ``limit`` compiled rungs per precision the ladder uses, the most recently used, over every
        frame size, and drop those no frame ran for a minute (0: every rung stays compiled; ``count=False``: only
        the idle rule, for budget mode); a dropped rung is compiled again from the engine cache when a frame needs
        it (``PreparedBackend.limit_compiled``). Applies now and to backends made later (backend auto's choice)."""
        if limit < 0:
            raise ValueError(f"the compiled-rung limit must be >= 0 (0: no limit), got {limit}")
        with self._lock:
            self._compiled_limit = (int(limit), bool(count))
            for backend in self._backends.values():
                backend.limit_compiled(*self._compiled_limit)

    @property
    def compiled_rungs(self) -> int:
        """Compiled graphs held now, every precision, size and thread count."""
        return sum(backend.compiled_count for backend in self._backends.values())

    @property
    def recompiles(self) -> int:
        """Rungs compiled again after the limit dropped them (each stalled one frame)."""
        return sum(backend.recompiles for backend in self._backends.values())

    def set_threads(self, threads: int) -> None:
        """Run the next frames on ``threads`` CPU threads, in torch and in every backend's own pool (OpenVINO).
        Called between frames, on the thread that calls ``infer``."""
        with self._lock:
            for backend in self._backends.values():
                backend.set_threads(threads)

    @property
    def eager_fallbacks(self) -> str:
        """Empty when every backend is the one asked for and every prepared rung is compiled; else what is not."""
        problems = [f"{name}: {backend.name}" for name, backend in self._backends.items() if backend.name != self.backend]
        problems += [f"{name}: {rung} runs eagerly" for name, backend in self._backends.items()
                     for rung in getattr(backend, "eager_rungs", [])]
        return "; ".join(problems)

    def prepared_files(self) -> list[tuple[str, Path, str]]:
        """(step name, cached file, "built" | "reused") of every rung a caching backend prepared."""
        return [(rung if name == "fp32" else f"{rung}@{name}", path, status)
                for name, backend in self._backends.items() for rung, (path, status) in getattr(backend, "engines", {}).items()]

    def set_instance_score_threshold(self, threshold: float) -> None:
        """The score an instance needs from the next frame on (families with instances; others ignore it)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"instance score threshold must be in [0, 1], got {threshold}")
        with self._lock:
            if self.family.has_instances:
                self.family.instance_score_threshold = float(threshold)

    def set_merge_rate(self, rate: float) -> None:
        """Set the scalar merge rate in [0, 0.95] (a step of ``ladder``); applied from the next ``infer``."""
        rate = float(rate)
        if not 0.0 <= rate <= MAX_MERGE_RATE:
            raise ValueError(f"merge_rate must lie in [0, {MAX_MERGE_RATE}], got {rate}")
        with self._lock:  # calibrate_precision replaces the ladder under this lock: read it under it too
            step = self.family.merge_step(rate, step_for_rate(rate, self.ladder))
            self._step, self._merge, self._merge_rate = step, step.config, rate

    def set_preset(self, name: str) -> None:
        """Use a named Segformer++ preset ("none", "hq", "fast", "2x2") instead of the scalar rate; presets run in
        the precision of the ladder's merged steps."""
        config = preset(name)
        if not self.family.merge_configs and name != "none":
            raise ValueError(f"preset {name!r} is a SegFormer merge preset; {self.family.name} models take merge_rate")
        with self._lock:
            step = self.ladder[0] if name == "none" else Step(float("nan"), config, self.ladder[-1].precision)
            self._step, self._merge = step, step.config  # "none": the family's unmerged rung
            self._merge_rate = 0.0 if name == "none" else float("nan")

    def set_merge_config(self, config: MergeConfig, rate: float = float("nan")) -> None:
        precision = step_for_rate(rate, self.ladder).precision if math.isfinite(rate) else self.ladder[-1].precision
        with self._lock:
            self._step, self._merge, self._merge_rate = Step(rate, config, precision), config, rate

    def calibrate_precision(self, rgb: np.ndarray, threshold: float = AUTO_MIN_AGREEMENT) -> float:
        """``precision: auto``: compare the half-precision unmerged model with fp32 on a real frame; keep the half
        steps when the arg-max agrees on at least ``threshold`` of the pixels, else compute every step in fp32.
        Runs by itself on the first ``infer``; returns the agreement (NaN when there is nothing to decide)."""
        self._calibration_pending = False
        half = next((step.precision for step in self.ladder if step.precision != "fp32"), None)
        if half is None:
            return float("nan")
        exact = self.ladder[0].config  # the family's unmerged rung
        pixels = self._network_input(rgb, exact)

        def labels(precision: str) -> torch.Tensor:
            return self._run(pixels, exact, precision, 0.0).argmax(dim=1)

        with torch.inference_mode():
            exact, fast = labels("fp32"), labels(half)
        agreement = (exact == fast).float().mean().item()
        if agreement >= threshold:
            LOG.info("precision auto: %s agrees with fp32 on %.2f %% of this frame's pixels; merge rates above 0 "
                     "run in %s", half, 100 * agreement, half)
            return agreement
        LOG.warning("precision auto: %s agrees with fp32 on only %.2f %% of this frame's pixels (< %.1f %%); every "
                    "merge rate runs in fp32", half, 100 * agreement, 100 * threshold)
        with self._lock:
            self.ladder = with_precision(self.ladder, "fp32")
            self.precision_plan = "fp32"
            self._step = Step(self._step.rate, self._step.config, "fp32")
            self.step_times = {}
            # its compiled rungs would stay in memory for good (a whole ladder: hundreds of MB with OpenVINO)
            self._backends.pop(half, None)
        if self.backend != "eager" and self.input_size is not None:
            self.warm()  # the fp32 backend had only rate 0 prepared
        return agreement

    def _network_input(self, rgb: np.ndarray, merge: MergeConfig) -> torch.Tensor:
        """The normalised network input for ``rgb`` on the rung of ``merge`` (the family's ``network_input``)."""
        return self.family.network_input(rgb, merge, self.input_size)

    def _forward(self, pixels: torch.Tensor, merge: MergeConfig, precision: str, rate: float):
        """The family's raw network output, through the backend of ``precision``."""
        return self.family.forward(pixels, merge, precision, rate, self._backends[precision])

    def _run(self, pixels: torch.Tensor, merge: MergeConfig, precision: str, rate: float) -> torch.Tensor:
        """The class scores (1, K, h, w) at the network's resolution (Mask2Former: its semantic scores)."""
        return self.family.scores(self._forward(pixels, merge, precision, rate))

    def _current(self) -> tuple[Step, MergeConfig, float]:
        with self._lock:
            return self._step, self._merge, self._merge_rate

    @torch.inference_mode()
    def logits(self, rgb: np.ndarray, merge: MergeConfig | None = None) -> torch.Tensor:
        """The raw logits for ``rgb`` at the network's input size (1/4 of it for SegFormer, less on merged rungs)."""
        step, current, rate = self._current()
        merge = merge if merge is not None else current
        return self._run(self._network_input(rgb, merge), merge, step.precision, rate)

    @torch.inference_mode()
    def infer(self, rgb: np.ndarray, confidence: bool = True, calibrate: bool = True,
              instances: bool = True) -> SegmentationResult:
        """Segment one HxWx3 uint8 RGB frame; ``confidence=False`` skips the confidence map (the node computes it
        only while someone subscribes to it), ``instances=False`` a family's instances and panoptic segments. ``calibrate=False`` for a frame that says nothing about precision
        (start-up's black warm-up frame): ``precision: auto``'s agreement check then waits for the next frame."""
        if calibrate:
            self._last_size = tuple(rgb.shape[:2])
        if self._auto_candidates and calibrate:
            self.choose_backend(tuple(self.input_size or rgb.shape[:2]))
        if self._warm_on_new_sizes:
            now = time.monotonic()
            self._size_last_seen[rgb.shape[:2]] = now  # first: this frame's size is never the stale one
            if len(self._size_last_seen) > 1 and now - min(self._size_last_seen.values()) >= STALE_SIZE_S:
                self.free_sizes_unseen_for(STALE_SIZE_S, now)  # a camera that changed size, or went away
            if rgb.shape[:2] not in self._warmed_sizes:
                LOG.info("backend %s: preparing every rung for %dx%d frames", self.backend, *rgb.shape[:2])
                self.warm(size=rgb.shape[:2])
        if self._calibration_pending and calibrate:
            self.calibrate_precision(rgb)
        for backend in self._backends.values():
            backend.drop_idle()  # also a precision's backend that no frame runs now (limit_compiled)
        start = time.perf_counter()
        step, merge, rate = self._current()
        pixels = self._network_input(rgb, merge)
        network_start = time.perf_counter()
        raw = self._forward(pixels, merge, step.precision, rate)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the time is the network's, not the launch's; post-processing waits anyway
        network_end = time.perf_counter()
        # At the process's thread count: switching torch's pools around post-processing every frame made both
        # threads' pools contend on a busy CPU (inference/threads.py chooses the count between frames instead).
        # instances=False only where it means something: families written before it keep their 4-argument outputs
        skip = {} if instances or not self.family.has_instances else {"instances": False}
        outputs = self.family.outputs(raw, rgb.shape[:2], self.upsample, confidence, **skip)
        end = time.perf_counter()
        return SegmentationResult(outputs.class_map, outputs.confidence, (end - start) * 1e3, rate,
                                  step.name, outputs.instances, outputs.panoptic,
                                  preprocess_ms=(network_start - start) * 1e3,
                                  network_ms=(network_end - network_start) * 1e3,
                                  postprocess_ms=(end - network_end) * 1e3)


def undominated(times: dict[float, float], margin: float = DOMINANCE_MARGIN) -> list[float]:
    """The rates (in order) whose time is at least ``margin`` below that of every lower rate kept before them."""
    kept, best = [], math.inf
    for rate in sorted(times):
        if not kept or times[rate] < best * (1.0 - margin):
            kept.append(rate)
            best = times[rate]
    return kept


def _version(backend: str) -> str:
    """The installed version of the package behind ``backend`` ("" for eager and compile: torch's is keyed apart)."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"openvino": "openvino", "tensorrt": "torch_tensorrt"}.get(backend)
    try:
        return version(package) if package else ""
    except PackageNotFoundError:
        return ""


def _pick_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        LOG.warning("device %r requested but CUDA is not available; using the CPU", device)
        return torch.device("cpu")
    return torch.device(device)
