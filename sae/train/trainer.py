"""The training loop: initialise from a cache sample, step, track dead latents, log, evaluate,
checkpoint, and write the run directory.

Host-device syncs happen only on log/eval/checkpoint steps so the GPU never waits for Python.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sae.atomic import atomic_write_text, tmp_path
from sae.errors import SaeError
from sae.runtime import RankInfo, resolve_device
from sae.train import distributed as ddp
from sae.train.archs import Forward, auxk_loss, forward
from sae.train.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from sae.train.config import RESUME_FIXED, TOPK_FAMILY, TrainConfig
from sae.train.data import CacheSource, DataSource
from sae.train.model import CONFIG_FILE, WEIGHTS_FILE, SparseAutoencoder
from sae.train.optim import DecoderAdam

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# AuxK is switched on and off by looking for dead latents this many times per dead window
# (--dead-tokens): a latent is dead after that many tokens without firing.
AUX_CHECKS_PER_DEAD_WINDOW = 8
# What every checkpoint holds (later additions are read with defaults, see _restore)
CHECKPOINT_KEYS = (
    "step",
    "model",
    "optimizer",
    "cursors",
    "rngs",
    "since_fired",
    "theta",
    "theta_count",
    "aux_active",
    "seconds",
)


def geometric_median(x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Weiszfeld's iteration: the point with least summed distance, robust to outlier tokens."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-6 * y.norm().clamp_min(1e-12):
            return y_new
        y = y_new
    return y


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then constant, then linear decay to 0 over the last decay_fraction."""
    factor = 1.0
    if cfg.warmup_steps > 0:
        factor = min(factor, (step + 1) / cfg.warmup_steps)
    decay_steps = int(cfg.decay_fraction * cfg.steps)
    if decay_steps > 0:
        factor = min(factor, (cfg.steps - step) / decay_steps)
    return cfg.lr * factor


class Trainer:
    """One training run (one rank of it under torchrun)."""

    def __init__(
        self, cfg: TrainConfig, source: DataSource, info: RankInfo, device: torch.device
    ) -> None:
        self.cfg, self.source, self.info, self.device = cfg, source, info, device
        self.out = Path(cfg.out)
        self.step = 0
        self.seconds_before = 0.0
        self._resolve()
        self.sae = SparseAutoencoder(cfg.sae_config()).to(device)
        # On CUDA: torch's fused Adam, and W_dec's projection + Adam + renormalisation as one
        # Triton pass (sae/kernels/decoder_adam.py); CPU runs the same math in plain PyTorch.
        cuda = device.type == "cuda"
        self.opt = DecoderAdam(
            self.sae.parameters(),
            self.sae.W_dec,
            cfg.lr,
            (0.9, 0.999),
            fused=cuda,
            fused_decoder=cuda,
            state_dtype=getattr(torch, cfg.adam_state),
        )
        F = cfg.n_latents
        self.since_fired = torch.zeros(F, dtype=torch.int64, device=device)
        self.theta = torch.zeros((), device=device)
        self.theta_count = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.aux_active = False
        self.batchtopk_candidates: int | None = None  # BatchTopK's per-row candidates (adaptive)
        self.batchtopk_dense_steps = 0  # steps where BatchTopK's sparse path had short rows
        self.last_good_step: int | None = None
        self.cursor: dict | None = None
        self.last_metrics: dict = {}  # the last logged training metrics (for the summary)
        if cfg.resume:
            self._load_checkpoint()
        else:
            self._initialise()
        self.heldout = source.heldout(cfg.eval_tokens) if info.is_main else None

    # --- set-up ----------------------------------------------------------------------------
    def _resolve(self) -> None:
        cfg, src = self.cfg, self.source
        cfg.validate_options()
        cfg.d_model = src.d_model
        cfg.n_latents = cfg.resolve_latents(src.d_model)
        cfg.world_size = self.info.world_size
        for key, value in src.provenance.items():
            setattr(cfg, key, value)
        if cfg.batch % cfg.world_size:
            raise SaeError(f"--batch {cfg.batch} must be divisible by the {cfg.world_size} ranks")
        tokens = cfg.tokens if cfg.tokens is not None else src.n_train_tokens
        cfg.steps = tokens // cfg.batch
        if cfg.steps < 1:
            raise SaeError(
                f"{tokens} tokens make no full batch of {cfg.batch}; "
                "lower --batch or train on more --tokens"
            )
        self._check_out_dir()

    def _check_out_dir(self) -> None:
        cfg = self.cfg
        if self.out.exists() and not self.out.is_dir():
            raise SaeError(f"--out {self.out} is a file; pass a directory (created if missing)")
        parent = next((p for p in self.out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise SaeError(f"--out {self.out} cannot be created: {parent} is a file")
        has_run = (self.out / CONFIG_FILE).exists() or checkpoint_path(self.out).exists()
        if cfg.resume:
            if not (self.out / CONFIG_FILE).exists():
                raise SaeError(f"--resume: {self.out} holds no run; start it without --resume")
            saved = TrainConfig.read(self.out / CONFIG_FILE)
            if saved.get("d_model") != cfg.d_model:
                raise SaeError(
                    f"the cache has d_model {cfg.d_model} but the run in {self.out} was trained "
                    f"with d_model {saved.get('d_model')}; resume with the cache it was trained "
                    "on, or start a new run in another --out"
                )
            self._check_same_cache(saved)
            changed = [
                f"{name} ({saved.get(name)!r} → {getattr(cfg, name)!r})"
                for name in RESUME_FIXED
                if saved.get(name) != getattr(cfg, name)
            ]
            if changed:
                raise SaeError(
                    f"--resume with different options than the run in {self.out}: "
                    f"{', '.join(changed)}; pass the options in {self.out / CONFIG_FILE}"
                )
            scale = saved.get("input_scale")
            if not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
                raise SaeError(f"{self.out / CONFIG_FILE}: input_scale is not a positive number")
            cfg.input_scale = float(scale)
        elif has_run and not cfg.overwrite:
            raise SaeError(
                f"{self.out} already holds a run; pass --resume to continue it, "
                "--overwrite to start over, or choose another --out"
            )

    def _check_same_cache(self, saved: dict) -> None:
        """--resume on a cache of another model, layer, hook or context would train half a run
        on other activations; a field either side does not know (cfg defaults) is not compared."""
        cfg, default = self.cfg, TrainConfig(cache="", out="")
        unknown = {key: getattr(default, key) for key in ("model", "layer", "hook", "context")}
        differ = [
            f"{key} {saved.get(key)!r} (run) vs {getattr(cfg, key)!r} (cache)"
            for key, none in unknown.items()
            if saved.get(key, none) != none
            and getattr(cfg, key) != none
            and saved.get(key) != getattr(cfg, key)
        ]
        if differ:
            raise SaeError(
                f"--resume: the cache {cfg.cache} is not the one the run in {self.out} was "
                f"trained on: {', '.join(differ)}; resume with that cache, or start a new run "
                "in another --out"
            )

    @torch.no_grad()
    def _initialise(self) -> None:
        """Input scale and b_dec from a cache sample; W_enc = W_dec (unit rows)."""
        cfg = self.cfg
        sample = self.source.sample(cfg.init_tokens, cfg.seed).float()
        sample = sample[torch.isfinite(sample).all(dim=1)]
        mean_sq = sample.pow(2).sum(1).mean().item() if sample.shape[0] else math.nan
        if not math.isfinite(mean_sq) or mean_sq <= 0:
            raise SaeError(
                "the cache sample is all zeros or not finite; check it with `sae store verify`"
            )
        cfg.input_scale = math.sqrt(cfg.d_model / mean_sq)
        self.sae.cfg.input_scale = cfg.input_scale
        gen = torch.Generator().manual_seed(cfg.seed)
        self.sae.init_weights(gen)
        scaled = sample * cfg.input_scale
        b_dec = geometric_median(scaled) if cfg.b_dec_init == "median" else scaled.mean(0)
        self.sae.b_dec.copy_(b_dec.to(self.device))
        if cfg.arch == "jumprelu":
            self.sae.threshold.fill_(cfg.jumprelu_init_threshold)

    def _load_checkpoint(self) -> None:
        ckpt = load_checkpoint(self.out)
        missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
        if missing:
            raise SaeError(
                f"{checkpoint_path(self.out)} is not a checkpoint of `sae train` (it lacks "
                f"{', '.join(missing)}); start the run over with --overwrite instead of --resume"
            )
        try:
            self._restore(ckpt)
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as err:
            raise SaeError(
                f"cannot resume from {checkpoint_path(self.out)}: {type(err).__name__}: {err}; "
                "it is damaged or was written by another version. Start over with --overwrite"
            ) from None
        if self.info.is_main:
            self._truncate_metrics()

    def _restore(self, ckpt: dict) -> None:
        cfg = self.cfg
        shapes = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
        want = {k: tuple(v.shape) for k, v in self.sae.state_dict().items()}
        if shapes != want:
            raise SaeError(
                f"the checkpoint in {self.out} holds tensors {shapes} but this run needs {want} "
                f"(d_model {cfg.d_model}, {cfg.n_latents} latents); use the matching cache/options"
            )
        self.sae.cfg.input_scale = cfg.input_scale
        self.sae.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.last_good_step = self.step
        self.seconds_before = float(ckpt["seconds"])
        self.since_fired.copy_(ckpt["since_fired"])
        self.theta.copy_(ckpt["theta"])
        self.theta_count.copy_(ckpt["theta_count"])
        self.aux_active = bool(ckpt["aux_active"])
        # absent from checkpoints written before they were saved: learnt again
        self.batchtopk_candidates = int(ckpt.get("batchtopk_candidates", 0)) or None
        self.batchtopk_dense_steps = int(ckpt.get("batchtopk_dense_steps", 0))
        self.last_metrics = _json_dict(ckpt.get("last_metrics"))  # for a no-op resume's summary
        cursors, rngs = ckpt["cursors"], ckpt["rngs"]
        if not (isinstance(cursors, list) and isinstance(rngs, list)) or len(rngs) != len(cursors):
            raise TypeError("cursors and rngs must be lists with one entry per rank")
        if len(cursors) != self.info.world_size:
            raise SaeError(
                f"the checkpoint was written by {len(cursors)} ranks; resume with as many"
            )
        self.cursor = cursors[self.info.rank]
        set_rng_state(rngs[self.info.rank])

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint, so a resumed run repeats none."""
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    # --- one step --------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> Forward:
        cfg, sae = self.cfg, self.sae
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        fwd = forward(
            sae,
            x,
            cfg.l0_coef,
            cfg.jumprelu_bandwidth,
            cfg.deterministic,
            encoder_bf16=cfg.encoder_dtype == "bfloat16",
            info=self.info,
            batchtopk_candidates=self.batchtopk_candidates,
        )
        if fwd.candidates is not None:  # rows were short: more candidates from now on
            self.batchtopk_candidates = fwd.candidates
        self.batchtopk_dense_steps += fwd.dense_rows > 0
        total = fwd.loss
        if self.aux_active and cfg.arch in TOPK_FAMILY and cfg.aux_coef > 0:
            dead = self.since_fired >= cfg.dead_tokens
            aux = auxk_loss(sae, fwd, dead, cfg.aux_k, cfg.deterministic)
            if aux is not None:
                total = total + cfg.aux_coef * aux
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        ddp.average_gradients(list(sae.parameters()), self.info)
        self.opt.step()  # also keeps W_dec's rows unit-norm (DecoderAdam)
        with torch.no_grad():
            if cfg.arch == "jumprelu":
                sae.threshold.clamp_(min=1e-6)
            fired = ddp.any_rank(fwd.fired, self.info)
            self.since_fired += cfg.batch
            self.since_fired.masked_fill_(fired, 0)
            if fwd.min_kept is not None:
                self._update_theta(fwd.min_kept)
            bad = ~torch.isfinite(total.detach())
            self.first_bad = torch.where(
                bad & (self.first_bad < 0),
                torch.full_like(self.first_bad, self.step),
                self.first_bad,
            )
        self.step += 1
        return fwd

    def _update_theta(self, min_kept: torch.Tensor) -> None:
        """BatchTopK θ: running mean of the smallest kept activation, used at inference.

        min_kept is already the global batch's (forward_batchtopk reduces it over ranks).
        """
        valid = torch.isfinite(min_kept)
        m = self.cfg.theta_momentum
        blended = torch.where(self.theta_count == 0, min_kept, m * self.theta + (1 - m) * min_kept)
        self.theta = torch.where(valid, blended, self.theta)
        self.theta_count = self.theta_count + valid.to(torch.int64)
        self.sae.threshold.fill_(0.0).add_(self.theta)

    def _check_finite(self) -> None:
        bad = ddp.max_over_ranks(int(self.first_bad.item()), self.info, self.device)
        if bad >= 0:
            where = (
                f"the last good checkpoint (step {self.last_good_step}) is in "
                f"{checkpoint_path(self.out)}; "
                if self.last_good_step is not None
                else "no checkpoint was written yet; "
            )
            raise SaeError(
                f"the loss became NaN/inf at step {bad + 1}; {where}"
                f"lower --lr (now {self.cfg.lr:g}) or check the cache with `sae store verify`, "
                "then rerun (with --resume to continue from the checkpoint)"
            )

    # --- metrics, eval, checkpoints ------------------------------------------------------------
    @torch.no_grad()
    def batch_metrics(self, fwd: Forward) -> dict:
        # FVU of the global batch: error and variance summed over ranks before dividing (an
        # average of the ranks' own FVUs would measure each against its own share's mean). The
        # variance comes from float64 sums, Σ‖x‖² − ‖Σx‖²/n, so the ranks add one vector.
        target = fwd.target.double()
        err = (fwd.recon().double() - target).pow(2).sum()
        n = torch.tensor(float(target.shape[0]), dtype=torch.float64, device=target.device)
        head = [fwd.loss.detach().double(), fwd.l0.double(), err, target.pow(2).sum(), n]
        sums = ddp.sum_over_ranks(torch.cat([torch.stack(head), target.sum(0)]), self.info)
        total_sq = sums[5:].pow(2).sum().reshape(1)  # ‖Σx‖²
        loss, l0, err, sq, n, total_sq = torch.cat([sums[:5], total_sq]).tolist()
        world = self.info.world_size
        fvu = err / max(sq - total_sq / n, 1e-12)
        dead = int((self.since_fired >= self.cfg.dead_tokens).sum().item())
        return {"loss": loss / world, "fvu": fvu, "l0": l0 / world, "dead": dead}

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """FVU, L0 and never-firing latents on the held-out tokens (inference-time σ)."""
        if self.heldout is None or self.heldout.shape[0] == 0:
            return None
        sae, cfg = self.sae, self.cfg
        mode = "threshold" if cfg.arch in ("batchtopk", "jumprelu") else "topk"
        err = sq = l0 = 0.0
        fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=self.device)
        total = self.heldout.double().sum(0)
        mean = (total / self.heldout.shape[0]).float().to(self.device) * cfg.input_scale
        for chunk in self.heldout.split(cfg.batch):
            x = chunk.to(self.device).float()
            if mode == "topk":  # sparse decode: no dense (B, F) latents to multiply
                vals, idx = sae.encode(x)
                recon = sae.decode(vals, idx)
                active = vals > 0
                fired[idx[active]] = True
            else:
                latents = sae.encode_dense(x, mode=mode)
                recon = sae.decode_dense(latents)
                active = latents > 0
                fired |= active.any(0)
            target = x * cfg.input_scale
            err += (recon - target).pow(2).sum().item()
            sq += (target - mean).pow(2).sum().item()
            l0 += active.sum().item()
        n = self.heldout.shape[0]
        return {
            "fvu": err / max(sq, 1e-12),
            "l0": l0 / n,
            "dead": int((~fired).sum().item()),
            "eval_tokens": n,
        }

    def save_checkpoint(self) -> None:
        self._check_finite()
        cursors = ddp.gather_objects(self.stream.cursor(), self.info)
        rngs = ddp.gather_objects(rng_state(), self.info)
        if self.info.is_main:
            payload = {
                "step": self.step,
                "model": {k: v.detach().cpu() for k, v in self.sae.state_dict().items()},
                "optimizer": self.opt.state_dict(),
                "cursors": cursors,
                "rngs": rngs,
                "since_fired": self.since_fired.cpu(),
                "theta": self.theta.cpu(),
                "theta_count": self.theta_count.cpu(),
                "aux_active": self.aux_active,
                # BatchTopK's learnt candidates: a resumed run decodes like one never stopped
                "batchtopk_candidates": self.batchtopk_candidates or 0,
                "batchtopk_dense_steps": self.batchtopk_dense_steps,
                "seconds": self.seconds_before + time.perf_counter() - self.t0,
                "last_metrics": json.dumps(self.last_metrics),
                "d_model": self.cfg.d_model,
            }
            save_checkpoint(self.out, payload)
        self.last_good_step = self.step
        ddp.barrier(self.info)

    @property
    def aux_check_every(self) -> int:
        """Steps between looking for dead latents (AuxK runs while there are some): a fixed
        fraction of the dead window, so how often a run logs never changes how it trains."""
        return max(1, self.cfg.dead_tokens // (self.cfg.batch * AUX_CHECKS_PER_DEAD_WINDOW))

    def _logged_heldout(self, step: int) -> bool:
        path = self.out / METRICS_FILE
        if not path.exists():
            return False
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("split") == "heldout" and record.get("step") == step:
                return True
        return False

    def _log(self, record: dict) -> None:
        if self.info.is_main:
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, info = self.cfg, self.info
        # Every rank has checked --out and read its checkpoint before rank 0 writes there: a
        # rank still checking would otherwise find this run's config and refuse to start.
        ddp.barrier(info)
        if info.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise SaeError(f"cannot create --out {self.out}: {err.strerror}") from None
            if not cfg.resume and cfg.overwrite:
                from sae.eval.frequency import FREQUENCY_FILE
                from sae.eval.pipeline import EVAL_FILE

                # Everything the earlier run wrote goes: its weights would otherwise load under
                # this run's config until this run finishes, and its eval results describe them.
                names = (METRICS_FILE, SUMMARY_FILE, EVAL_FILE, FREQUENCY_FILE, WEIGHTS_FILE)
                paths = [self.out / n for n in (*names, CONFIG_FILE)]
                for path in [*paths, checkpoint_path(self.out)]:
                    path.unlink(missing_ok=True)
                    tmp_path(path).unlink(missing_ok=True)
            atomic_write_text(self.out / CONFIG_FILE, cfg.to_json())
        ddp.barrier(info)
        local_batch = cfg.batch // info.world_size
        self.stream = self.source.train_batches(
            local_batch,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
            device=self.device,
            cursor=self.cursor,
        )
        self.t0 = time.perf_counter()
        start_step = self.step
        progress = self._progress()
        try:
            while self.step < cfg.steps:
                x = next(self.stream)
                fwd = self.train_step(x)
                if self.step % self.aux_check_every == 0:  # a sync: not every step
                    self.aux_active = bool((self.since_fired >= cfg.dead_tokens).any())
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._check_finite()
                    last = self.last_metrics = self.batch_metrics(fwd)
                    elapsed = time.perf_counter() - self.t0
                    rate = (self.step - start_step) * cfg.batch / max(elapsed, 1e-9)
                    self._log(
                        {"step": self.step, "tokens": self.step * cfg.batch, **last}
                        | {"lr": lr_at(cfg, self.step - 1), "tokens_per_s": rate}
                        | {"seconds": elapsed}
                    )
                    if progress is not None:
                        progress[0].update(progress[1], completed=self.step * cfg.batch, **last)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    ev = self.evaluate() if info.is_main else None
                    if ev is not None:
                        self._log({"step": self.step, "split": "heldout", **ev})
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
            if self.step > start_step:
                self.save_checkpoint()  # so a finished run can be extended with --resume
        finally:
            if progress is not None:
                progress[0].stop()
            self.stream.close()
        seconds = time.perf_counter() - self.t0
        return self._finish(seconds, start_step, self.last_metrics)

    def _progress(self):
        if not (self.cfg.progress and self.info.is_main):
            return None
        from sae.progress import make_progress

        progress = make_progress(
            "tok",
            extra="loss {task.fields[loss]:.4g} fvu {task.fields[fvu]:.3f} "
            "L0 {task.fields[l0]:.1f} dead {task.fields[dead]}",
        )
        task = progress.add_task(
            f"train {self.cfg.arch}",
            total=self.cfg.steps * self.cfg.batch,
            completed=self.step * self.cfg.batch,
            loss=float("nan"),
            fvu=float("nan"),
            l0=0.0,
            dead=0,
        )
        progress.start()
        return progress, task

    def _finish(self, seconds: float, start_step: int, last: dict) -> dict:
        cfg = self.cfg
        ev = self.evaluate() if self.info.is_main else None
        tokens_run = (self.step - start_step) * cfg.batch
        summary = {
            "steps": self.step,
            "tokens": self.step * cfg.batch,
            "seconds": self.seconds_before + seconds,
            "tokens_per_s": tokens_run / max(seconds, 1e-9),
            "train": last,
            **(ev or {"fvu": None, "l0": None, "dead": None}),
        }
        if self.info.is_main:
            # Once per step: not again on a no-op resume, but also after a kill that came
            # between the final checkpoint and this line.
            if ev is not None and not self._logged_heldout(self.step):
                self._log({"step": self.step, "split": "heldout", **ev})
            self.sae.save(self.out, config_json=cfg.to_json())
            atomic_write_text(self.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        ddp.barrier(self.info)
        return summary


def _json_dict(text: object) -> dict:
    """A JSON object from a checkpoint field ({} when absent or not an object)."""
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def train(cfg: TrainConfig, source: DataSource | None = None) -> dict:
    """Run `sae train` for this process (one rank under torchrun); returns the summary."""
    cfg.validate_options()
    device = resolve_device(cfg.device)
    cpu_deterministic = cfg.deterministic and device.type == "cpu"
    with ddp.joined(str(device)) as info, _deterministic_algorithms(cpu_deterministic):
        if source is None:
            source = CacheSource(cfg.cache, read_workers=cfg.read_workers)
        torch.manual_seed(cfg.seed + info.rank)
        trainer = Trainer(cfg, source, info, device)
        return trainer.run()


@contextmanager
def _deterministic_algorithms(wanted: bool) -> Iterator[None]:
    """--deterministic on the CPU: PyTorch's deterministic algorithms while this run trains.
    The CPU reference's gather backward (index_put with accumulate) otherwise adds in thread
    order; on CUDA our kernels take the flag themselves."""
    if not wanted or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


__all__ = ["Trainer", "geometric_median", "lr_at", "train"]
