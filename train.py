"""Train the Video2LoRA hypernetwork (method.md §6), and write the teacher targets it trains on (§6.2).

    python train.py teacher --size 2.2B --manifest raw.jsonl --out teacher.jsonl
    python train.py --size 500M --train teacher.jsonl --val val.jsonl --out runs/500m
    torchrun --nproc_per_node 4 train.py --size 500M ...     # DDP; the hypernetwork is the only trained module
    python train.py --recipe toy/recipes/hypernet.toml ...    # a recipe file sets the defaults of the options

One step is the paper's three (sample_losses): the frozen VLM reads [video + instruction] under no_grad and hands
over every layer's hidden states; the hypernetwork turns them into one LoRA per sample; the *same* frozen VLM reads
the text-only [prompt][teacher answer] with that LoRA and zero visual tokens, and the cross-entropy on the answer
flows back into the hypernetwork only. Beside it, optional: a KL term to the video-in-context teacher
(--kl-weight), rows trained through the composition of their clip's two halves' adapters (--compose-prob), and a
cache of what the frozen VLM computes (--cache-hidden-mb), so later epochs skip its passes.

Run folder (--out): log.jsonl (one line per step and per validation), and the checkpoints latest/ and best/:
    hypernet.safetensors + hypernet.json   weights + HyperConfig (hypernet.load_hypernet(dir) reads these)
    state.json                             step, metrics, best val CE, the run's arguments, the base model folder
    trainer.pt                             optimizer, scheduler, RNG: tensors only (torch.load weights_only=True)
"""
from __future__ import annotations

import argparse, contextlib, json, math, os, shutil, signal, sys, time, tomllib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
from hypernet import HyperConfig, HyperNet, compile_hypernet, compose_lora, load_hypernet, save_hypernet

UNABLE = "Unable to determine."  # method.md §6.2: what an empty teacher answer becomes
TOY_RECIPE = Path(__file__).resolve().parent / "toy" / "recipes" / "hypernet.toml"  # --size tiny's defaults
# The paper's optimiser settings (method.md §6.3), fixed: AdamW (0.9, 0.999), weight decay 0.01 on every
# parameter, linear warm-up over 3 % of the steps then cosine to 0, gradient norm clipped at 1.
WEIGHT_DECAY, WARMUP, CLIP = 0.01, 0.03, 1.0


# ------------------------------------------------------------------------------------------------ recipes
def read_recipe(parser: argparse.ArgumentParser, path) -> dict:
    """A recipe is a TOML file of `option = value` lines, named as the parser's long options (with _ or -). Each
    value is checked against the option's type and choices, so a typo is an error, never an ignored line."""
    try:
        recipe = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"error: recipe {path}: {e}") from None
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in recipe.items():
        a = actions.get(key.replace("-", "_"))
        if a is None or not a.option_strings or a.dest in ("recipe", "help"):
            raise SystemExit(f"error: recipe {path}: unknown option {key!r}")
        want = a.type or (type(a.const) if isinstance(a.const, bool) else str)
        values = value if isinstance(value, list) and a.nargs in ("+", "*") else [value]
        ok = all(isinstance(v, want) and not (isinstance(v, bool) and want is not bool)
                 or (want is float and isinstance(v, int) and not isinstance(v, bool)) for v in values)
        if not ok or (a.choices and any(v not in a.choices for v in values)):
            raise SystemExit(f"error: recipe {path}: {key} = {value!r} is not a valid --{a.dest.replace('_', '-')}")
        out[a.dest] = [want(v) for v in values] if a.nargs in ("+", "*") else want(value)
    return out


def parse_with_recipe(parser: argparse.ArgumentParser, argv, recipe=None) -> argparse.Namespace:
    """Parse argv with the defaults of --recipe (or of `recipe` when none is given); the command line overrides."""
    first, _ = parser.parse_known_args(argv)
    path = getattr(first, "recipe", None) or recipe
    if path:
        parser.set_defaults(**read_recipe(parser, path))
    args = parser.parse_args(argv)
    if path and hasattr(args, "recipe"):
        args.recipe = str(path)  # recorded with the run's arguments
    return args


# ------------------------------------------------------------------------------------------------ setup helpers
def model_setup(args, device):
    """Base model + Processor. bf16 weights on CUDA as released (method.md §3.3), fp32 on CPU."""
    try:
        model_dir = M.resolve_model_dir(args.size, args.model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not (Path(model_dir) / "config.json").is_file():
        raise SystemExit(f"error: no base model at {model_dir} (pass --model DIR, or build the toy base first)")
    dtype = M.pick_dtype(args.dtype, device)
    # The method reads 12 frames resized to a 384-px longest edge on the released models (§2); a model folder of
    # our own (the toy base) keeps the frame size its processor config names.
    video_size = args.video_size or (384 if args.model is None and args.size in M.PRESETS else None)
    proc = data.Processor(model_dir, max_frames=args.frames, video_size=video_size)
    return M.load_model(model_dir, dtype=dtype, device=device), proc, model_dir


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class Dist:
    """Rank facts from torchrun's environment; a plain run is rank 0 of 1 and never touches torch.distributed."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.device = M.pick_device(device_name, self.local_rank)
        if self.world > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def sum(self, *values: float) -> list[float]:
        """Sum numbers over ranks (float64, so counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            dist.barrier()


# ------------------------------------------------------------------------------------------------ data
def micro_batches(n_rows: int, start_step: int, args, d: Dist):
    """This rank's row indices for every micro-batch from `start_step` on.

    The order is a pure function of the step: epoch e is a permutation seeded by (seed, e), and step s takes
    global positions [s*G, (s+1)*G) with G = batch * world * accum. So a resumed run sees exactly the rows the
    uninterrupted one would, and rank r of micro-batch m takes the same rows a single process would take there.
    Each index comes with whether its step may compose (step >= --compose-from; Rows.composed then decides).
    """
    perms: dict[int, list[int]] = {}

    def row(p: int) -> int:
        e = p // n_rows
        if e not in perms:
            perms.clear()
            perms[e] = torch.randperm(n_rows, generator=torch.Generator().manual_seed(args.seed * 100003 + e)).tolist()
        return perms[e][p % n_rows]

    for s in range(start_step, args.steps):
        for m in range(args.accum):
            p0 = (s * args.accum + m) * args.batch * d.world + d.rank * args.batch
            yield [(row(p), s + 1 >= args.compose_from) for p in range(p0, p0 + args.batch)]


# ------------------------------------------------------------------------------------------------ the step
class HiddenCache:
    """What the frozen VLM computes, kept so that later epochs skip its passes (--cache-hidden-mb): the hidden states
    of each video (or segment) it has encoded and, with the KL term, the in-context teacher's logits on each row's
    answer tokens. The VLM never trains, so neither ever changes. States are kept without the left padding of the
    batch they came in and padded again with zeros, which the hypernetwork masks out. Either, first computed inside
    a differently padded batch, can differ from an unpadded pass in the last bits."""

    def __init__(self, mb: float):
        self.left, self.store, self.hits, self.misses = int(mb * 2**20), {}, 0, 0

    def keep(self, key, t: torch.Tensor):
        if key not in self.store and t.numel() * t.element_size() <= self.left:
            self.store[key], self.left = t.clone(), self.left - t.numel() * t.element_size()

    def encode(self, vlm: M.SmolVLM, ids, pixels, mask, keys: list[str] | None) -> torch.Tensor:
        """(B, L, T, D): the L hidden states entering each layer, for left-padded ids (B, T)."""
        if keys and all(k in self.store for k in keys):
            self.hits += 1
            B, T = ids.shape
            first = self.store[keys[0]]
            H = first.new_zeros(B, first.shape[0], T, first.shape[-1])
            for b, k in enumerate(keys):
                H[b, :, T - self.store[k].shape[1]:] = self.store[k]
            return H
        self.misses += 1
        H = encode(vlm, ids, pixels, mask)
        for b, k in enumerate(keys or []):
            self.keep(k, H[b, :, H.shape[2] - int(mask[b].sum()):])
        return H

    def teacher(self, vlm: M.SmolVLM, batch: dict) -> torch.Tensor:
        """(N, V): the video-in-context teacher's logits at the labelled answer tokens of every row, rows in order."""
        keys = [("teacher", k) for k in batch["row_ids"]]  # one per row, apart from the videos' keys
        if all(k in self.store for k in keys):
            self.hits += 1
            return torch.cat([self.store[k] for k in keys])
        self.misses += 1
        logits = vlm(batch["t_ids"], batch["pixel_values"], batch["t_mask"]).logits[:, :-1].float()
        answer = batch["t_labels"][:, 1:] != -100                                   # (B, U-1)
        for b, k in enumerate(keys):
            self.keep(k, logits[b][answer[b]])
        return logits[answer]


@torch.no_grad()
def encode(vlm: M.SmolVLM, ids, pixels, mask) -> torch.Tensor:
    """The frozen VLM reads [video + instruction], no LoRA, no LM head: the L states *entering* its layers
    (method.md §2), (B, L, T, D)."""
    return torch.stack(vlm(ids, pixels, mask, output_hidden_states=True, logits="none").hidden_states, dim=1)


def response_mean(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, U-1) per-token values on shifted labels -> (B,) mean over each sample's response tokens."""
    keep = labels[:, 1:] != -100
    return (per_token * keep).sum(1) / keep.sum(1).clamp(min=1)


def sample_losses(vlm: M.SmolVLM, hyper, batch: dict, layer_chunk=None, kl: bool = False,
                  cache: HiddenCache | None = None):
    """The paper's step, per sample: response CE (B,) and, with kl, the KL to the video-in-context teacher (B,)."""
    config = (hyper.module if hasattr(hyper, "module") else hyper).config  # under DDP, the wrapped HyperNet's
    # 1. Encode the video (several segments per sample for composed rows; data.VideoTextDataset).
    ids, pixels, mask = batch["ctx_ids"], batch.get("ctx_pixels", batch["pixel_values"]), batch["ctx_mask"]
    H = encode(vlm, ids, pixels, mask) if cache is None else cache.encode(vlm, ids, pixels, mask, batch["ctx_keys"])
    # 2. Generate the adapter: {target: (A (B, L, 2r, d_in), B (B, L, 2r, d_out))}; gradients reach the hypernetwork.
    lora = hyper(H, mask, layer_chunk=layer_chunk)
    if "owner" in batch:  # composition training: segment adapters -> one per sample, as compose.py makes it
        lora = compose_lora(lora, batch["owner"], config.rank)
    # 3. Text only, zero visual tokens: [user: prompt][assistant: teacher answer]; CE on the answer, in fp32 (§6.2).
    logits = vlm(batch["input_ids"], attention_mask=batch["attention_mask"], lora=lora, lora_alpha=config.alpha).logits
    labels = batch["labels"]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)                       # (B, U-1, V)
    ce = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]       # (B, U-1)
    return response_mean(ce, labels), (teacher_kl(vlm, batch, logp, cache) if kl else None)


def teacher_kl(vlm: M.SmolVLM, batch: dict, logp: torch.Tensor, cache: HiddenCache | None) -> torch.Tensor:
    """(B,): KL(teacher || student) on each answer token, averaged per sample, the teacher being the same frozen
    model with the video in context (an option beyond the paper's recipe, where the weight is 0)."""
    with torch.no_grad():
        if cache is None:
            t_logits = vlm(batch["t_ids"], batch["pixel_values"], batch["t_mask"]).logits[:, :-1].float()
            t = t_logits[batch["t_labels"][:, 1:] != -100]                      # (N, V)
        else:
            t = cache.teacher(vlm, batch)
    # Both sequences end in the same answer tokens, so the labelled positions pair up one to one, in order.
    answer = batch["labels"][:, 1:] != -100
    tok = F.kl_div(logp[answer], F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)   # (N,)
    per_token = torch.zeros(answer.shape, dtype=tok.dtype, device=tok.device)
    per_token[answer] = tok
    return response_mean(per_token, batch["labels"])


def train_step(vlm, hyper, loader_iter, opt, sched, args, d: Dist, cache=None) -> dict:
    """One optimizer step over `accum` micro-batches on every rank; returns the step's global metrics.

    The gradient is that of mean_m[(1/N_m) * sum of per-sample losses of micro-batch m over all ranks], which is
    exactly what one process holding the whole global batch computes, skipped rows included: rows whose video
    fails to decode drop out of N_m on every rank alike. A rank left with nothing still joins DDP's gradient
    all-reduce with a zero-weight pass; a micro-batch with nothing on any rank is skipped by all.
    """
    opt.zero_grad(set_to_none=True)
    inner = hyper.module if d.world > 1 else hyper
    ce_sum = kl_sum = n_local = composed = 0.0
    skipped, synced = 0, False
    for m in range(args.accum):
        batch = next(loader_iter)
        n = 0 if batch is None else len(batch["row_ids"])
        n_all, failed = d.sum(n, args.batch - n)  # one all-reduce for both
        skipped += int(failed)
        if n_all == 0:
            continue
        last = m == args.accum - 1
        with contextlib.nullcontext() if (last or d.world == 1) else hyper.no_sync():
            if n == 0:
                c = inner.config
                lora = hyper(torch.zeros(1, c.num_layers, 1, c.hidden_size, device=d.device))
                loss_sum = sum(a.sum() + b.sum() for a, b in lora.values()) * 0.0
            else:
                ce, kl = sample_losses(vlm, hyper, to_device(batch, d.device), args.layer_chunk, args.kl_weight > 0,
                                       cache)
                loss_sum = (ce if kl is None else ce + args.kl_weight * kl).sum()
                ce_sum, n_local = ce_sum + ce.detach().sum().item(), n_local + n
                composed += batch.get("composed", 0)
                kl_sum += 0.0 if kl is None else kl.detach().sum().item()
            # DDP averages gradients over ranks, hence * world; / (N_m * accum) makes it a mean over the step.
            (loss_sum * d.world / (n_all * args.accum)).backward()
        synced |= last
    params = [p for p in hyper.parameters() if p.grad is not None]
    if d.world > 1 and not synced and params:  # the last micro-batch was skipped: average by hand
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= d.world
    grad_norm = torch.nn.utils.clip_grad_norm_(hyper.parameters(), CLIP).item() if params else 0.0
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    ce_sum, kl_sum, n, composed = d.sum(ce_sum, kl_sum, n_local, composed)
    return {"ce": ce_sum / max(n, 1), "kl": kl_sum / max(n, 1), "lr": lr, "grad_norm": grad_norm,
            "samples": int(n), "composed": int(composed), "skipped": skipped}


@torch.no_grad()
def validate(vlm, hyper: HyperNet, val: data.VideoTextDataset, args, d: Dist, cache=None) -> float:
    """Mean per-sample response CE over the validation rows (sharded over ranks, summed back)."""
    hyper.eval()
    mine = list(range(d.rank, len(val), d.world))
    ce_sum = n = 0.0
    for i in range(0, len(mine), args.batch):
        batch = val.collate([val[j] for j in mine[i:i + args.batch]])
        if batch is not None:
            ce, _ = sample_losses(vlm, hyper, to_device(batch, d.device), args.layer_chunk, cache=cache)
            ce_sum, n = ce_sum + ce.sum().item(), n + len(ce)
    hyper.train()
    ce_sum, n = d.sum(ce_sum, n)
    return ce_sum / max(n, 1)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(run: Path, name: str, hyper: HyperNet, state: dict, opt=None, sched=None) -> Path:
    """Write run/name atomically: everything goes to name.tmp, then two renames swap it in (a crash between
    them leaves name.old, which --resume also accepts). `best` holds no optimizer state, only the weights."""
    tmp, final, old = run / f"{name}.tmp", run / name, run / f"{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hypernet(tmp, hyper)
    if opt is not None:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    for name in ("latest", "latest.old"):
        if (run / name / "state.json").is_file():
            return run / name
    return None


def restore_trainer(ckpt: Path, opt, sched):
    t = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)  # tensors only, never a pickle
    opt.load_state_dict(t["optimizer"])
    sched.load_state_dict(t["scheduler"])
    torch.set_rng_state(t["rng"]["cpu"])
    if "cuda" in t["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(t["rng"]["cuda"]))


def cosine_with_warmup(steps: int, warmup_frac: float):
    """LR factor: linear warm-up over warmup_frac of the steps, then cosine to 0 (method.md §6.3)."""
    warm = max(1, round(warmup_frac * steps))
    return lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))


class StopFlag:
    """Ctrl-C or SIGTERM ask for a stop at the end of the current step (then latest is saved); a second Ctrl-C
    interrupts at once. Handlers are restored on exit, so calling main() from Python leaves no trace."""

    def __init__(self):
        self.set, self.old = False, {}

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving latest", file=sys.stderr)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def _ignore_sigint(_worker_id):
    """Ctrl-C reaches DataLoader workers too; they must keep decoding while the main process finishes its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def trim_log(path: Path, step: int):
    """Drop log lines of steps after `step` (rewritten atomically), so a resumed run's log has no duplicates."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines(keepends=True) if ln.endswith("\n")
            and json.loads(ln).get("step", 0) <= step]
    Path(str(path) + ".tmp").write_text("".join(keep))
    os.replace(str(path) + ".tmp", path)


# ------------------------------------------------------------------------------------------------ the loop
HYPER_FLAGS = ("latent_size", "n_latents", "num_blocks", "n_heads", "head_dim", "n_kv_heads", "rank", "proj_mult",
               "init", "out_norm")


def hyper_config(args, vlm_config) -> HyperConfig:
    return HyperConfig.for_model(vlm_config, targets=tuple(args.targets), **{f: getattr(args, f) for f in HYPER_FLAGS})


def train(args) -> dict:
    d = Dist(args.device)
    torch.manual_seed(args.seed)
    vlm, proc, model_dir = model_setup(args, d.device)
    run, say = Path(args.out), (print if d.rank == 0 else (lambda *a, **k: None))
    if not 0 <= args.compose_prob <= 1:
        raise SystemExit("error: --compose-prob must be in [0, 1]")
    train_set = data.VideoTextDataset(args.train, proc, teacher_view=args.kl_weight > 0, cache_mb=args.cache_mb,
                     compose_prob=args.compose_prob, seed=args.seed, compose_where=args.compose_where)
    val_set = data.VideoTextDataset(args.val, proc, limit=args.val_rows, cache_mb=args.cache_mb) if args.val else None
    say(f"device {d.device} x {d.world}, base {model_dir}; {train_set.summary()}", file=sys.stderr)
    if len(train_set) == 0:
        raise SystemExit(f"error: {args.train} has no rows with a video file")
    ckpt = latest_checkpoint(run) if args.resume else None
    if ckpt is not None:
        hyper, state = load_hypernet(ckpt, vlm.config, d.device), json.loads((ckpt / "state.json").read_text())
    else:
        hyper, state = HyperNet(hyper_config(args, vlm.config)).to(d.device), {"step": 0, "best_val_ce": None}
    hyper.train()  # load_hypernet returns it in inference mode
    opt = torch.optim.AdamW(hyper.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(args.steps, WARMUP))
    if ckpt is not None:
        restore_trainer(ckpt, opt, sched)
        say(f"resumed {ckpt} at step {state['step']}", file=sys.stderr)
    compile_hypernet(hyper, {"auto": None, "on": True, "off": False}[args.compile])
    train_cache = HiddenCache(args.cache_hidden_mb) if args.cache_hidden_mb > 0 else None
    val_cache = HiddenCache(args.cache_hidden_mb) if args.cache_hidden_mb > 0 else None
    wrapped = torch.nn.parallel.DistributedDataParallel(hyper) if d.world > 1 else hyper
    start = state["step"]
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=micro_batches(len(train_set), start, args, d),
                                              collate_fn=train_set.collate, num_workers=args.workers,
                                              worker_init_fn=_ignore_sigint))
    if d.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        trim_log(run / "log.jsonl", start)  # a crash may have logged steps after the checkpoint: they re-run
    log = open(run / "log.jsonl", "a") if d.rank == 0 else None
    bar = tqdm(total=args.steps, initial=start, desc="train", unit="step", disable=d.rank != 0, dynamic_ncols=True)
    skipped = state.get("skipped", 0)
    saved = lambda: {**state, "args": vars(args), "base_model": str(model_dir)}  # noqa: E731
    with StopFlag() as stop:
        for step in range(start + 1, args.steps + 1):
            t0 = time.time()
            m = train_step(vlm, wrapped, loader, opt, sched, args, d, train_cache)
            skipped += m["skipped"]
            m = {"step": step, "loss": m["ce"] + args.kl_weight * m["kl"], **m,
                 "samples_per_s": m["samples"] / (time.time() - t0), "time": time.time()}
            state.update(step=step, skipped=skipped, train=m)
            if d.rank == 0:
                log.write(json.dumps(m) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", sps=f"{m['samples_per_s']:.1f}")
                bar.update(1)
            if val_set is not None and (step % args.val_every == 0 or step == args.steps):
                state["val_ce"] = validate(vlm, hyper, val_set, args, d, val_cache)
                say(f"\nstep {step}: val CE {state['val_ce']:.4f}", file=sys.stderr)
                if d.rank == 0:
                    log.write(json.dumps({"step": step, "val_ce": state["val_ce"], "time": time.time()}) + "\n")
                    if state["best_val_ce"] is None or state["val_ce"] < state["best_val_ce"]:
                        state["best_val_ce"] = state["val_ce"]
                        save_checkpoint(run, "best", hyper, saved())
            stopping = bool(d.sum(stop.set)[0]) or step == args.stop_at
            if stopping or step % args.save_every == 0 or step == args.steps:
                if d.rank == 0:
                    save_checkpoint(run, "latest", hyper, saved(), opt, sched)
                d.barrier()
            if stopping:
                break
    bar.close()
    if log is not None:
        log.close()
    say(f"step {state['step']}: {skipped} rows skipped (video failed to decode); checkpoints in {run}", file=sys.stderr)
    if d.world > 1:
        dist.destroy_process_group()
    return state


# ------------------------------------------------------------------------------------------------ teacher targets
def finished_ids(out: Path) -> set[str]:
    """Ids already in the output manifest. A line cut short by a crash is removed (it was never finished)."""
    if not out.is_file():
        return set()
    raw = out.read_bytes()
    good = raw[: raw.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(good) != len(raw):
        with open(out, "r+b") as f:
            f.truncate(len(good))
    return {json.loads(ln)["id"] for ln in good.decode().splitlines() if ln.strip()}


def teacher(args):
    """method.md §6.2: the frozen VLM answers each row's prompt with the video in context (greedy, left-padded
    batches); its answer replaces target_text. Appends one batch at a time (flush + fsync), so a rerun resumes
    after the last finished row and never rewrites one."""
    device = M.pick_device(args.device)
    vlm, proc, model_dir = model_setup(args, device)
    rows, malformed = data.read_manifest(args.manifest)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(out)
    todo = [r for r in rows if r["id"] not in done]
    print(f"teacher {model_dir} on {device}: {len(done)} rows done, {len(todo)} to go", file=sys.stderr)
    skipped = 0
    with open(out, "a") as f, tqdm(total=len(todo), desc="teacher", unit="row") as bar:
        for i in range(0, len(todo), args.batch):
            kept, prompts, pixels = [], [], []
            for row in todo[i:i + args.batch]:
                try:
                    ids, px = proc.question_inputs(row["prompt"], video=proc.load_video(row["video_path"]))
                except data.DecodeError as e:
                    print(f"warning: row {row['id']} skipped: {e}", file=sys.stderr)
                    skipped += 1
                    continue
                kept.append(row), prompts.append(ids[0].tolist()), pixels.append(px)
            if kept:
                ids, mask = data.pad_batch(prompts, proc.pad_id, "left")
                answers = M.generate(vlm, ids.to(device), mask.to(device), torch.cat(pixels).to(device),
                                     max_new_tokens=args.max_new_tokens, eos_token_id=proc.eou_id)
                lines = []
                for row, a in zip(kept, answers):
                    # Paths are written relative to the output's folder, where read_manifest resolves them.
                    rel = os.path.relpath(Path(row["video_path"]).resolve(), out.parent.resolve())
                    lines.append(json.dumps({**row, "video_path": rel, "source_target_text": row["target_text"],
                                             "target_text": proc.decode(a).strip() or UNABLE}) + "\n")
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(todo[i:i + args.batch]))
    print(f"wrote {out}: {len(done) + len(todo) - skipped} rows; skipped {skipped} undecodable videos, "
          f"{malformed} malformed lines", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ CLI
def add_model_args(p):
    p.add_argument("--size", default=None, help="base model preset: tiny, 256M, 500M, 2.2B (default tiny)")
    p.add_argument("--model", default=None, help="a SmolVLM2 folder (config.json + safetensors); overrides --size")
    p.add_argument("--frames", type=int, default=12, help="frames per video (method: 12)")
    p.add_argument("--video-size", type=int, default=None,
                   help="longest edge frames are resized to (default: 384 for released sizes, else the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="base model weights (auto: bf16 on CUDA, fp32 on CPU); the hypernetwork stays fp32")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--recipe", default=None, help="TOML file of option defaults (default: the paper's recipe; "
                   "with --size tiny, toy/recipes/hypernet.toml); the command line overrides it")
    p.add_argument("--train", help="training manifest (JSONL: id, video_path, prompt, target_text)")
    p.add_argument("--val", help="validation manifest; best/ keeps the lowest validation CE")
    p.add_argument("--out", required=True, help="run folder for log.jsonl, latest/ and best/")
    p.add_argument("--resume", action="store_true", help="continue --out from latest/ with the run's saved arguments")
    g = p.add_argument_group("optimisation (defaults: method.md §6.3)")
    g.add_argument("--steps", type=int, default=60000, help="optimizer steps (sets the cosine schedule)")
    g.add_argument("--batch", type=int, default=2, help="samples per device per micro-batch")
    g.add_argument("--accum", type=int, default=8, help="micro-batches per step (x batch x GPUs = global batch)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--seed", type=int, default=0, help="init and data order")
    g = p.add_argument_group("beyond the paper's recipe (all off by default)")
    g.add_argument("--kl-weight", type=float, default=0.0, help="KL to the video-in-context teacher")
    g.add_argument("--compose-prob", type=float, default=0.0,
                   help="fraction of training rows answered by the composition of their clip's two halves' adapters "
                        "(the paper: 0, so composition is zero-shot)")
    g.add_argument("--compose-from", type=int, default=0,
                   help="first step that composes rows (whole clips only before it, so the adapter learns to read "
                        "the video before it learns to share the update with another segment's)")
    g.add_argument("--compose-where", default=None, metavar="FIELD",
                   help="compose only rows whose manifest FIELD is true (dotted into nested objects, e.g. "
                        "spec.two_part: the toy clips whose halves show different objects)")
    g = p.add_argument_group("running")
    g.add_argument("--val-every", type=int, default=1000, help="validate every N steps (and at the end)")
    g.add_argument("--val-rows", type=int, default=1024, help="validation rows used (method: val_core, 1024)")
    g.add_argument("--save-every", type=int, default=1000, help="write latest/ every N steps (and at the end)")
    g.add_argument("--stop-at", type=int, default=None, help="stop after this step, keeping the --steps schedule "
                                                            "(for time-sliced jobs; continue with --resume)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding videos")
    g.add_argument("--cache-mb", type=float, default=0, help="keep decoded clips in memory, up to this many MB per "
                   "dataset and DataLoader worker (default 0: decode every time)")
    g.add_argument("--cache-hidden-mb", type=float, default=0, help="keep the frozen VLM's hidden states of each "
                   "clip in memory, up to this many MB (train and validation each), so later epochs skip the VLM "
                   "encode; with --kl-weight, the teacher's answer logits too (default 0: encode every time)")
    g.add_argument("--layer-chunk", type=int, default=None, help="hypernet layers per chunk (less memory)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the perceiver "
                                                                                     "(auto: on CUDA)")
    g = p.add_argument_group("hypernetwork (defaults: the released one, method.md §3.1)")
    g.add_argument("--targets", nargs="+", default=["down_proj"], choices=list(M.LORA_TARGETS))
    for f in HYPER_FLAGS:  # --latent-size, --n-latents, ..., named as the HyperConfig fields they set
        default = HyperConfig.__dataclass_fields__[f].default
        g.add_argument("--" + f.replace("_", "-"), type=type(default), default=default, help=f"default {default}",
                       choices={"init": ("released", "lora"), "out_norm": ("none", "batch")}.get(f))
    return p


def teacher_main(argv):
    p = argparse.ArgumentParser(prog="train.py teacher", description=teacher.__doc__)
    add_model_args(p)
    p.add_argument("--manifest", required=True, help="input manifest (its target_text is replaced)")
    p.add_argument("--out", required=True, help="output manifest; rerun the same command to resume")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    if not Path(args.manifest).is_file():
        raise SystemExit(f"error: manifest {args.manifest} not found")
    teacher(args)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["teacher"]:
        return teacher_main(argv[1:])
    p = train_parser()
    first, _ = p.parse_known_args(argv)
    toy = (first.size or "tiny") == "tiny" and first.model is None
    args = parse_with_recipe(p, argv, TOY_RECIPE if toy else None)
    run = Path(args.out)
    ckpt = latest_checkpoint(run)
    if args.resume:
        if ckpt is None:
            raise SystemExit(f"error: nothing to resume in {run} (no latest/ checkpoint)")
        # The saved arguments become the defaults, so only what is given again on the command line changes.
        saved = json.loads((ckpt / "state.json").read_text())["args"]
        saved.pop("stop_at", None)
        p.set_defaults(**{k: v for k, v in saved.items() if k in vars(args)})
        args = p.parse_args(argv)
    elif ckpt is not None:
        raise SystemExit(f"error: {run} already holds a run; pass --resume to continue it or choose another --out")
    for name in ("train", "val"):
        f = getattr(args, name)
        if (name == "train" and f is None) or (f is not None and not Path(f).is_file()):
            raise SystemExit(f"error: --{name} manifest {f} not found")
    return train(args)


if __name__ == "__main__":
    main()
