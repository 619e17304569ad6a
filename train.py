"""Train the Video2LoRA hypernetwork (method.md §6), and write the teacher targets it trains on (§6.2).

    python train.py --size 500M --videos DIR                  # the paper's whole recipe from a folder of videos
    python train.py teacher --size 2.2B --manifest raw.jsonl --out teacher.jsonl
    python train.py --size 500M --train teacher.jsonl --val val.jsonl --out runs/500m
    torchrun --nproc_per_node 4 train.py --size 500M ...     # DDP; the hypernetwork is the only trained module
    python train.py --recipe toy/recipes/hypernet.toml ...    # a recipe file sets the defaults of the options

With --videos (a folder of videos, or a raw manifest of id/video_path/prompt rows) one run folder holds every stage
and a rerun of the same command resumes each: data/manifest.jsonl (method.md §6.1's span rows and prompt mix),
data/teacher.jsonl (the teacher's answers with the video in context, §6.2), data/train.jsonl + data/val.jsonl (split
by video), then training. Defaults come from --size: tiny is the shipped toy recipe (toy/recipes/hypernet.toml),
the released sizes the paper's (§6.3); the run prints where each came from.

One step is the paper's three (sample_losses): the frozen VLM reads [video + instruction] under no_grad and hands
over every layer's hidden states; the hypernetwork turns them into one LoRA per sample; the *same* frozen VLM reads
the text-only [prompt][teacher answer] with that LoRA and zero visual tokens, and the cross-entropy on the answer
flows back into the hypernetwork only. Beside it, optional: a KL term to the video-in-context teacher
(--kl-weight), rows trained through the composition of their clip's two halves' adapters (--compose-prob), and a
cache of what the frozen VLM computes (--cache-hidden-mb), so later epochs skip its passes.

Run folder (--out): log.jsonl (one line per step and per validation), and the checkpoints latest/ (latest.old/ is
the save before it) and best/:
    hypernet.safetensors + hypernet.json   weights + HyperConfig + the fingerprint of the base it was trained on
    state.json                             step, metrics, best val CE, the run's arguments, the base model
    trainer.pt                             optimizer, scheduler, RNG: tensors only (torch.load weights_only=True)
Ctrl-C or SIGTERM (to the process or its whole group) finishes the step, saves latest/ and exits 128 + signal.
"""
from __future__ import annotations

import argparse, contextlib, hashlib, json, math, os, shutil, signal, sys, time, tomllib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
from adapter import Terminated, base_facts, run_cli, write_atomic
from hypernet import HyperConfig, HyperNet, compile_hypernet, compose_lora, load_hypernet, save_hypernet

UNABLE = "Unable to determine."  # method.md §6.2: what an empty teacher answer becomes
TOY_RECIPE = Path(__file__).resolve().parent / "toy" / "recipes" / "hypernet.toml"  # --size tiny's defaults
# The paper's optimiser settings (method.md §6.3), fixed: AdamW (0.9, 0.999), weight decay 0.01 on every
# parameter, linear warm-up over 3 % of the steps then cosine to 0, gradient norm clipped at 1.
WEIGHT_DECAY, WARMUP, CLIP = 0.01, 0.03, 1.0
# The teacher of each size (method.md §6.2, §11: the public recipe's 2.2B teacher for both students); the toy base
# teaches itself, as toy/reproduce.sh does.
TEACHER = {"tiny": "tiny", "256M": "2.2B", "500M": "2.2B", "2.2B": "2.2B"}
# What each preset expects to run on (the paper reports no hardware; see docs/training.md for the measurements).
HARDWARE = {
    "tiny": "a CPU: the shipped toy run took 18 min to step 3500 on 2 cores",
    "256M": "one CUDA GPU with 24 GB or more (bf16; an estimate, not measured)",
    "500M": "one CUDA GPU with 24 GB or more (bf16; an estimate, not measured); the paper's effective batch of 64 "
            "is 4 GPUs x 2 x accum 8",
    "2.2B": "one CUDA GPU with 40 GB or more (bf16; an estimate, not measured); the paper's effective batch of 64 "
            "is 4 GPUs x 2 x accum 8",
}


# ------------------------------------------------------------------------------------------------ the CLI boundary
class Stopped(Terminated):
    """Ctrl-C or SIGTERM stopped the command after it saved its work; adapter.run_cli prints `what` (how to go on)
    and exits 128 + signal."""

    def __init__(self, signum: int, what: str = ""):
        super().__init__(signum)
        self.what = what


def fail(msg: str):
    """A user's mistake: one line on stderr, exit 1 (raised as SystemExit so Python callers can catch it)."""
    raise SystemExit(f"error: {msg}")


def temp_path(path: Path) -> Path:
    """A sibling of `path` to write first and rename over it: its name ends in .tmp (so .gitignore covers it) and
    never exceeds the file-name limit, however long the final name."""
    raw = path.name.encode()
    if len(raw) > 240:  # bytes, as the limit (255) counts them
        raw = raw[:200].decode(errors="ignore").encode() + b"-" + hashlib.sha256(raw).hexdigest()[:12].encode()
    return path.with_name(raw.decode() + ".tmp")


def umask_modes(folder: Path):
    """Give every file under `folder` the permissions the umask asks for: safetensors writes its files 0600."""
    try:  # the umask, read without changing it (Linux); else the classic set-and-restore
        mask = int(next(ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
                        if ln.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    for f in [folder] if folder.is_file() else folder.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def check_output_file(out: Path, *inputs: Path):
    """An output file must not be one of the inputs (also through a link) and must be a regular file if it exists."""
    for src in inputs:
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
            fail(f"--out {out} is the input {src}: writing it would destroy the input; choose another --out")
    if out.exists() and not out.is_file():
        fail(f"--out {out} exists and is not a regular file")


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
def resolve_base(size, model) -> Path:
    """The base model's folder: --model, the shipped toy base, or a released size from the Hugging Face cache/hub.
    A hub miss (offline, no network, no access) is one line that says how to fix it (model.resolve_model_dir)."""
    try:
        model_dir = M.resolve_model_dir(size, model)
    except ValueError as e:
        fail(str(e))
    if not (Path(model_dir) / "config.json").is_file():
        fail(f"no base model at {model_dir} (pass --model DIR, or build the toy base first)")
    return Path(model_dir)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    try:
        return M.pick_device(name, local_rank)
    except ValueError as e:
        fail(str(e))


def model_setup(args, device):
    """Base model + Processor. bf16 weights on CUDA as released (method.md §3.3), fp32 on CPU."""
    model_dir = resolve_base(args.size, args.model)
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
        self.device = pick_device(device_name, self.local_rank)
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
    if n == 0:  # a CE of 0 over nothing would become the best checkpoint
        fail(f"no validation row of {val.manifest} has a decodable video (see the warnings above)")
    return ce_sum / n


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(run: Path, name: str, hyper: HyperNet, state: dict, opt=None, sched=None) -> Path:
    """Write run/name atomically: everything goes to name.tmp, then two renames swap it in; the save it replaces
    stays as name.old, which --resume falls back to. `best` holds no optimizer state, only the weights. The base
    model's fingerprint (state["base"]) goes into hypernet.json too, so whoever loads the weights can check it.
    The temp folder never outlives a failed or interrupted save."""
    tmp, final, old = run / f"{name}.tmp", run / name, run / f"{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hypernet(tmp, hyper, base=state.get("base"))
        if opt is not None:
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        umask_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    return final


def run_checkpoints(run: Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The run's checkpoints whose state.json reads and whose files are there, in the order --resume tries them:
    latest/, latest.old/ (the save before it), best/ (weights only). Returns (usable, what is wrong with the rest)."""
    usable, problems = [], []
    for name in ("latest", "latest.old", "best"):
        ckpt = run / name
        if not ckpt.exists():
            continue
        try:
            state = json.loads((ckpt / "state.json").read_bytes())
            if not (isinstance(state, dict) and type(state.get("step")) is int and state["step"] >= 0
                    and isinstance(state.get("args"), dict)):
                raise ValueError("state.json is not a training state")
            for f in ("hypernet.safetensors", "hypernet.json") + (("trainer.pt",) if name != "best" else ()):
                if not (ckpt / f).is_file():
                    raise ValueError(f"no {f}")
        except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.append(f"{ckpt}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        usable.append((ckpt, state))
    return usable, problems


def load_checkpoint(found: list[tuple[Path, dict]], vlm_config, device):
    """The first of `found` whose weights and trainer state load -> (path, state, hyper, trainer dict or None);
    each one that does not is a one-line warning."""
    for ckpt, state in found:
        try:
            hyper = load_hypernet(ckpt, vlm_config, device)
            trainer = None
            if (ckpt / "trainer.pt").is_file():  # tensors only, never a pickle
                trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
            return ckpt, state, hyper, trainer
        except Exception as e:  # a truncated or corrupted file: safetensors, torch.load and json all raise their own
            print(f"warning: {ckpt} does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"trying the one before it", file=sys.stderr)
    fail(f"no checkpoint of {found[0][0].parent} loads (see the warnings above)")


def restore_trainer(t: dict, opt, sched):
    opt.load_state_dict(t["optimizer"])
    sched.load_state_dict(t["scheduler"])
    torch.set_rng_state(t["rng"]["cpu"])
    if "cuda" in t["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(t["rng"]["cuda"]))


def base_record(vlm, model_dir: Path, size, model) -> dict:
    """What identifies the base a hypernetwork is trained on: its name and adapter.base_facts' fingerprints."""
    return {"base_model": Path(model).name if model else M.PRESETS.get(size, size or "tiny"), **base_facts(vlm)}


def same_base(recorded: dict | None, current: dict) -> bool:
    """Whether two base records agree on every fingerprint both have (a record without any agrees: older runs)."""
    keys = [k for k in (recorded or {}) if k.endswith("_sha256") and k in current]
    return all(recorded[k] == current[k] for k in keys)


def cosine_with_warmup(steps: int, warmup_frac: float):
    """LR factor: linear warm-up over warmup_frac of the steps, then cosine to 0 (method.md §6.3)."""
    warm = max(1, round(warmup_frac * steps))
    return lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))


class StopFlag:
    """Ctrl-C or SIGTERM ask for a stop at the end of the current step (or batch), after which the caller saves and
    raises Stopped; a second Ctrl-C interrupts at once. Handlers are restored on exit, so calling main() from
    Python leaves no trace."""

    def __init__(self, what: str = "stopping after this step and saving latest"):
        self.signum, self.what, self.old = 0, what, {}

    @property
    def set(self) -> bool:
        return bool(self.signum)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        print(f"\n{signal.Signals(signum).name}: {self.what}", file=sys.stderr)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def start_workers(loader: torch.utils.data.DataLoader):
    """iter(loader) with its worker processes deaf to Ctrl-C and SIGTERM: a signal sent to the whole process group
    (a terminal's Ctrl-C, `timeout`, a scheduler, kill -TERM -PGID) must not kill them mid-step and take the save
    down with them; the main process finishes the step and they end with it. The signals stay blocked while the
    workers are forked, so none arrives before quiet_worker has set them to be ignored."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def quiet_worker(_worker_id):
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def trim_log(path: Path, step: int):
    """Drop log lines of steps after `step`, and any line a crash cut short (rewritten atomically), so a resumed
    run's log has no duplicates."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_bytes().decode(errors="replace").splitlines(keepends=True):
        try:
            if ln.endswith("\n") and json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except (ValueError, AttributeError):
            pass
    write_atomic(path, "".join(keep))


# ------------------------------------------------------------------------------------------------ the loop
HYPER_FLAGS = ("latent_size", "n_latents", "num_blocks", "n_heads", "head_dim", "n_kv_heads", "rank", "proj_mult",
               "init", "out_norm")
ARCH_FLAGS = ("targets",) + HYPER_FLAGS  # what a checkpoint's weights are shaped by: --resume cannot change them


def hyper_config(args, vlm_config) -> HyperConfig:
    return HyperConfig.for_model(vlm_config, targets=tuple(args.targets), **{f: getattr(args, f) for f in HYPER_FLAGS})


def fingerprint(base: dict) -> str:
    """A short name for a base record's fingerprints (what error messages and file names show)."""
    return hashlib.sha256("".join(base[k] for k in sorted(base) if k.endswith("_sha256")).encode()).hexdigest()[:12]


def load_datasets(args, proc):
    train_set = data.VideoTextDataset(args.train, proc, teacher_view=args.kl_weight > 0, cache_mb=args.cache_mb,
                                      compose_prob=args.compose_prob, seed=args.seed, compose_where=args.compose_where)
    if len(train_set) == 0:
        fail(f"nothing to train on: {train_set.summary()}")
    val_set = data.VideoTextDataset(args.val, proc, limit=args.val_rows, cache_mb=args.cache_mb) if args.val else None
    if val_set is not None and len(val_set) == 0:
        fail(f"nothing to validate on: {val_set.summary()}")
    return train_set, val_set


def setup_hyper(args, found, base: dict, vlm, d: Dist, say):
    """A new hypernetwork, or the run's checkpoint (the first of `found` that loads) on the base it was trained on;
    its optimizer and schedule. best/ (no optimizer state) continues on a restarted optimizer, with a warning."""
    state, trainer = {"step": 0, "best_val_ce": None}, None
    if found:
        ckpt, recorded = found[0][0], found[0][1].get("base")
        if not same_base(recorded, base):
            fail(f"{ckpt} was trained on base {recorded.get('base_model')} (fingerprint {fingerprint(recorded)}), not "
                 f"on {base['base_model']} ({fingerprint(base)}): resume it with the --size/--model it was trained "
                 f"on, or start a new --out")
        ckpt, state, hyper, trainer = load_checkpoint(found, vlm.config, d.device)
        hyper = hyper.to(d.device)
    else:
        hyper = HyperNet(hyper_config(args, vlm.config)).to(d.device)
    hyper.train()  # load_hypernet returns it in inference mode
    opt = torch.optim.AdamW(hyper.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(args.steps, WARMUP))
    if found:
        if trainer is not None:
            restore_trainer(trainer, opt, sched)
        else:
            say(f"warning: {ckpt} holds no optimizer state: AdamW restarts at step {state['step']} (not an exact "
                f"continuation)", file=sys.stderr)
            opt.step()  # a no-op (no gradients) that lets the schedule be moved on without a warning
            for _ in range(state["step"]):
                sched.step()
        say(f"resumed {ckpt} at step {state['step']}", file=sys.stderr)
    state["base"] = base
    return hyper, opt, sched, state


def describe_run(args, sources: dict, model_dir, d: Dist, stop_at: int) -> str:
    """The preset and where each setting came from (the size's recipe, the command line, the resumed run)."""
    size = args.size or ("tiny" if args.model is None else None)
    recipe = f"the recipe {args.recipe}" if args.recipe else "the paper's recipe (method.md §6.3)"
    lines = [f"preset {'--size ' + size if size else '--model ' + str(args.model)}: base {model_dir}; defaults from "
             f"{recipe}",
             f"  {args.steps} steps (this run stops at {stop_at}), {args.batch} rows x {args.accum} micro-batches x "
             f"{d.world} process(es) = {args.batch * args.accum * d.world} rows a step, lr {args.lr:g} (warm-up 3 %, "
             f"cosine), {args.frames} frames; validation every {args.val_every} steps on up to {args.val_rows} rows"]
    for where in ("the command line", "the resumed run"):
        names = [f"{k}={getattr(args, k)}" for k, v in sources.items() if v == where and k not in ("resume", "out")]
        if names:
            lines.append(f"  from {where}: {', '.join(names)}")
    lines.append(f"  hardware: {HARDWARE.get(size, 'what the base model needs (a CUDA GPU for a real size)')}")
    return "\n".join(lines)


def log_eta(say, times: list[float], step: int, stop_at: int):
    """Once, after the first few steps of this process: the time per step and when the run will reach stop_at."""
    per = (times[-1] - times[0]) / (len(times) - 1)
    left = round(per * (stop_at - step))
    eta = f"{left // 3600} h {left % 3600 // 60} min" if left >= 3600 else f"{left // 60} min {left % 60} s"
    say(f"\n~{per:.2f} s a step (steps {step - len(times) + 2}-{step}, validation not counted): ETA {eta} to step "
        f"{stop_at}", file=sys.stderr)


def validate_and_keep_best(vlm, hyper, val_set, args, d: Dist, cache, state: dict, log, saved):
    """Validation CE into state and the log; best/ when it is the lowest yet."""
    state["val_ce"] = validate(vlm, hyper, val_set, args, d, cache)
    if d.rank == 0:
        print(f"\nstep {state['step']}: val CE {state['val_ce']:.4f}", file=sys.stderr)
        log.write(json.dumps({"step": state["step"], "val_ce": state["val_ce"], "time": time.time()}) + "\n")
        if state["best_val_ce"] is None or state["val_ce"] < state["best_val_ce"]:
            state["best_val_ce"] = state["val_ce"]
            save_checkpoint(Path(args.out), "best", hyper, saved())


def train(args, found=None, sources=None) -> dict:
    d = Dist(args.device)
    torch.manual_seed(args.seed)
    run, say = Path(args.out), (print if d.rank == 0 else (lambda *a, **k: None))
    if args.videos:
        prepare_data(args, d)  # manifest, teacher targets, split: args.train / args.val point at them
        if args.data_only:
            return {"step": 0}
    vlm, proc, model_dir = model_setup(args, d.device)
    base = base_record(vlm, model_dir, args.size, args.model)
    train_set, val_set = load_datasets(args, proc)
    say(f"device {d.device} x {d.world}, base {model_dir} (fingerprint {fingerprint(base)}); {train_set.summary()}",
        file=sys.stderr)
    hyper, opt, sched, state = setup_hyper(args, found, base, vlm, d, say)
    stop_at = min(args.stop_at or args.steps, args.steps)
    say(describe_run(args, sources or {}, model_dir, d, stop_at), file=sys.stderr)
    start = state["step"]
    if start >= stop_at:
        say(f"nothing to do: {run} is at step {start} (stop at {stop_at}); best/ and latest/ are there", file=sys.stderr)
        return state
    compile_hypernet(hyper, {"auto": None, "on": True, "off": False}[args.compile])
    caches = [HiddenCache(args.cache_hidden_mb) if args.cache_hidden_mb > 0 else None for _ in range(2)]
    wrapped = torch.nn.parallel.DistributedDataParallel(hyper) if d.world > 1 else hyper
    if d.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        trim_log(run / "log.jsonl", start)  # a crash may have logged steps after the checkpoint: they re-run
    saved = lambda: {**state, "args": vars(args), "base_model": str(model_dir)}  # noqa: E731
    with StopFlag() as stop, (open(run / "log.jsonl", "a") if d.rank == 0 else contextlib.nullcontext()) as log:
        loader = start_workers(torch.utils.data.DataLoader(
            train_set, batch_sampler=micro_batches(len(train_set), start, args, d), collate_fn=train_set.collate,
            num_workers=args.workers, worker_init_fn=quiet_worker))
        bar = tqdm(total=stop_at, initial=start, desc="train", unit="step", disable=d.rank != 0, dynamic_ncols=True)
        skipped, failed_in_a_row, times, lost = state.get("skipped", 0), 0, [], False
        for step in range(start + 1, stop_at + 1):
            t0 = time.time()
            try:
                m = train_step(vlm, wrapped, loader, opt, sched, args, d, caches[0])
            except RuntimeError:
                if not stop.set:
                    raise
                lost = True  # a DataLoader worker ended with the signal before the step was done: keep the last one
                break
            skipped += m["skipped"]
            failed_in_a_row = failed_in_a_row + m["skipped"] if m["samples"] == 0 else 0
            if failed_in_a_row >= len(train_set):
                fail(f"{failed_in_a_row} rows in a row had no decodable video: the videos of {args.train} do not "
                     f"decode (see the warnings above)")
            m = {"step": step, "loss": m["ce"] + args.kl_weight * m["kl"], **m,
                 "samples_per_s": m["samples"] / (time.time() - t0), "time": time.time()}
            state.update(step=step, skipped=skipped, train=m)
            if d.rank == 0:
                log.write(json.dumps(m) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", sps=f"{m['samples_per_s']:.1f}")
                bar.update(1)
            times.append(time.time())
            if len(times) == 3 and step < stop_at:  # the first step (caches, compiling) is not timed
                log_eta(say, times, step, stop_at)
            if val_set is not None and (step % args.val_every == 0 or step == args.steps):
                validate_and_keep_best(vlm, hyper, val_set, args, d, caches[1], state, log, saved)
            stopping = bool(d.sum(stop.signum)[0]) or step == stop_at
            if stopping or step % args.save_every == 0:
                if d.rank == 0:
                    save_checkpoint(run, "latest", hyper, saved(), opt, sched)
                d.barrier()
            if stopping:
                break
        if lost and d.rank == 0:
            save_checkpoint(run, "latest", hyper, saved(), opt, sched)
        del loader  # its workers end now, not whenever the interpreter gets to them
        bar.close()
    say(f"step {state['step']}: {skipped} rows skipped (video failed to decode); checkpoints in {run}", file=sys.stderr)
    if d.world > 1:
        dist.destroy_process_group()
    if stop.signum:
        raise Stopped(stop.signum, f"{run}/latest holds step {state['step']}; continue with: "
                                   f"python train.py --out {run} --resume")
    return state


# ------------------------------------------------------------------------------------------------ teacher targets
def finished_ids(out: Path, teacher_id: str) -> set[str]:
    """Ids already in the output manifest, which must be this teacher's own output: every line starts with its
    "teacher" field (a file written by anything else, or by another teacher model, is refused, never appended to).
    A last line cut short by a crash is removed (it was never finished)."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    cut = raw.rfind(b"\n") + 1
    done = set()
    for n, line in enumerate(raw[:cut].splitlines(), 1):
        try:
            row = json.loads(line)
            who = row["teacher"] if isinstance(row, dict) and isinstance(row.get("id"), str) else None
        except (ValueError, KeyError):
            who = None
        if who is None:
            fail(f"--out {out} holds lines train.py teacher did not write (line {n}); choose another --out")
        if who != teacher_id:
            fail(f"--out {out} holds answers of another teacher ({who}), not of {teacher_id}; choose another --out")
        done.add(row["id"])
    if cut != len(raw):
        if not raw[cut:].startswith(b'{"teacher": '):
            fail(f"--out {out} ends in a line train.py teacher did not write; choose another --out")
        with open(out, "r+b") as f:
            f.truncate(cut)
    return done


def teacher(args):
    """method.md §6.2: the frozen VLM answers each row's prompt with the video in context (greedy, left-padded
    batches); its answer replaces target_text. Appends one batch at a time (flush + fsync), so a rerun resumes
    after the last finished row and never rewrites one. Each row names the teacher (model and fingerprint)."""
    manifest, out = Path(args.manifest), Path(args.out)
    check_output_file(out, manifest)
    rows, malformed = data.read_manifest(manifest, need_target=False)
    if not rows:
        fail(f"manifest {manifest} has no usable rows ({malformed} malformed lines)")
    device = pick_device(args.device)
    vlm, proc, model_dir = model_setup(args, device)
    base = base_record(vlm, model_dir, args.size, args.model)
    teacher_id = f"{base['base_model']}@{fingerprint(base)}"
    done = finished_ids(out, teacher_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rows if r["id"] not in done]
    print(f"teacher {model_dir} on {device}: {len(done)} rows done, {len(todo)} to go", file=sys.stderr)
    skipped = 0
    with StopFlag("stopping after this batch") as stop, open(out, "a") as f, \
            tqdm(total=len(todo), desc="teacher", unit="row") as bar:
        for i in range(0, len(todo), args.batch):
            kept, prompts, pixels = [], [], []
            for row in todo[i:i + args.batch]:
                try:
                    span = {k: row[k] for k in ("start", "end") if row.get(k) is not None}
                    ids, px = proc.question_inputs(row["prompt"], video=proc.load_video(row["video_path"], **span))
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
                    rest = {k: v for k, v in row.items() if k != "teacher"}
                    lines.append(json.dumps({"teacher": teacher_id, **rest, "video_path": rel,
                                             "source_target_text": row.get("target_text", ""),
                                             "target_text": proc.decode(a).strip() or UNABLE}) + "\n")
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(todo[i:i + args.batch]))
            if stop.set and i + args.batch < len(todo):
                raise Stopped(stop.signum, f"{out} holds the finished rows; rerun the same command to go on")
    if todo and skipped == len(todo):
        fail(f"none of the {len(todo)} rows' videos decode (see the warnings above); {out} has no new rows")
    print(f"wrote {out}: {len(done) + len(todo) - skipped} rows; skipped {skipped} undecodable videos, "
          f"{malformed} malformed lines", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ from videos
def prepare_data(args, d: Dist):
    """--videos: the data stages of the paper's recipe, each kept in RUN/data/ and resumed by a rerun:
    1. manifest.jsonl: the span rows of every video and their prompts (data.manifest_from_videos, method.md §6.1),
       unless --videos is a manifest already;
    2. teacher.jsonl: the teacher's answers with the video in context (§6.2; `teacher`, resumable);
    3. train.jsonl / val.jsonl: split by video (data.split_by_video), rewritten the same way every time.
    Under torchrun the stages must have run already (--data-only, one process): the teacher is one process's job."""
    folder, src = Path(args.out) / "data", Path(args.videos)
    split = (folder / "train.jsonl", folder / "val.jsonl")
    if d.world > 1:
        if not split[0].is_file():
            fail(f"under torchrun, make the data first with one process: python train.py --videos {src} "
                 f"--out {args.out} --data-only")
        args.train, args.val = str(split[0]), str(split[1]) if split[1].is_file() else None
        return
    size = args.teacher_size or (TEACHER.get(args.size or "tiny") if args.model is None else None)
    model = args.teacher_model or (args.model if size is None else None)
    for s, m in ((size, model), (args.size, args.model)):  # both models are there (or a hub miss is said) before
        resolve_base(s, m)                                 # any work
    if not (src.is_dir() or src.is_file()):
        fail(f"--videos {src} is neither a folder of videos nor a manifest")
    folder.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        manifest = folder / "manifest.jsonl"
        source = {"videos": str(src.resolve()), "span_seconds": args.span_seconds}
        if manifest.is_file():
            try:
                before = json.loads((folder / "source.json").read_text())
            except (OSError, ValueError):
                before = None
            if before != source:
                fail(f"{args.out} was made from other videos or spans ({before}); choose another --out")
        else:
            rows, counts = data.manifest_from_videos(src, args.span_seconds, folder)
            print(f"{src}: {counts['videos']} videos ({counts['unreadable']} unreadable, {counts['with_metadata']} "
                  f"with FineVideo metadata); rows kept of each span kind: "
                  + ", ".join(f"{k} {counts[k + '_kept']}/{counts[k]}" for k in data.SPAN_MIX), file=sys.stderr)
            if not rows:
                fail(f"no readable video under {src} (looked for {', '.join(sorted(data.VIDEO_SUFFIXES))})")
            write_atomic(manifest, "".join(json.dumps(r) + "\n" for r in rows))
            write_atomic(folder / "source.json", json.dumps(source) + "\n")
    else:
        manifest = src
    teacher(argparse.Namespace(size=size, model=model, frames=args.frames, video_size=args.video_size,
                               device=args.device, dtype=args.dtype, manifest=str(manifest),
                               out=str(folder / "teacher.jsonl"), batch=args.teacher_batch,
                               max_new_tokens=args.teacher_tokens))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the teacher's weights are gone; the student's come next
    rows, _ = data.read_manifest(folder / "teacher.jsonl")
    train_rows, val_rows = data.split_by_video(rows, args.val_fraction)
    for path, part in zip(split, (train_rows, val_rows)):
        write_atomic(path, "".join(json.dumps({**r, "video_path": os.path.relpath(r["video_path"], folder)}) + "\n"
                                   for r in part))
    print(f"split by video: {len(train_rows)} training rows, {len(val_rows)} validation rows in {folder}",
          file=sys.stderr)
    args.train, args.val = str(split[0]), str(split[1]) if val_rows else None


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
    p.add_argument("--videos", help="a folder of videos (or a raw manifest of id/video_path/prompt rows): build the "
                   "manifest, run the teacher, split and train, all in --out (a rerun resumes each stage)")
    p.add_argument("--train", help="training manifest (JSONL: id, video_path, prompt, target_text)")
    p.add_argument("--val", help="validation manifest; best/ keeps the lowest validation CE")
    p.add_argument("--out", default=None, help="run folder for data/, log.jsonl, latest/ and best/ "
                                              "(default runs/SIZE)")
    p.add_argument("--resume", action="store_true", help="continue --out from latest/ with the run's saved arguments")
    g = p.add_argument_group("from videos (--videos; method.md §6.1-6.2)")
    g.add_argument("--span-seconds", type=float, default=30.0, help="without FineVideo scene metadata, videos are "
                   "cut into spans of about this length as scenes (adjacent rows join 2-3 of them)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="share of the videos held out for validation")
    g.add_argument("--teacher-size", default=None, help="teacher preset (default: 2.2B for the released sizes, "
                   "the base itself for tiny or --model)")
    g.add_argument("--teacher-model", default=None, help="a SmolVLM2 folder as the teacher")
    g.add_argument("--teacher-batch", type=int, default=8, help="teacher rows per generation batch")
    g.add_argument("--teacher-tokens", type=int, default=64, help="teacher answer length (method: 64 tokens)")
    g.add_argument("--data-only", action="store_true", help="stop after the data stages (then torchrun the rest)")
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


def check_numbers(args):
    """Numbers that would train nothing, or nonsense, are refused before anything loads."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name in ("steps", "batch", "accum", "val_every", "val_rows", "save_every", "frames", "teacher_batch",
                 "teacher_tokens", "latent_size", "n_latents", "num_blocks", "n_heads", "head_dim", "n_kv_heads",
                 "rank", "proj_mult"):
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in ("workers", "compose_from", "cache_mb", "cache_hidden_mb", "kl_weight"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            fail(f"{flag(name)} must be a number >= 0, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        fail(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.compose_prob <= 1:
        fail("--compose-prob must be in [0, 1]")
    if not 0 <= args.val_fraction < 1:
        fail(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not (args.span_seconds >= 1 and math.isfinite(args.span_seconds)):
        fail(f"--span-seconds must be at least 1, got {args.span_seconds}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        fail(f"--stop-at must be a step of the run, 1..{args.steps}, got {args.stop_at}")
    if args.layer_chunk is not None and args.layer_chunk < 1:
        fail(f"--layer-chunk must be at least 1, got {args.layer_chunk}")
    if args.video_size is not None and not 16 <= args.video_size <= 4096:
        fail(f"--video-size must be in 16..4096 px, got {args.video_size}")


def no_data(args):
    """What train.py needs, how to make it, and what the preset runs on: one block, exit 2."""
    size = args.size or "tiny"
    lines = ["error: train.py needs data to train on: --videos DIR (a folder of videos, or a raw manifest) or "
             "--train MANIFEST",
             f"  the paper's whole recipe from videos: python train.py --size {size} --videos DIR",
             f"    (span rows and prompts, teacher answers, a split by video and training, all in {args.out})",
             "  the paper trained on FineVideo (HuggingFaceFV/finevideo, 43k YouTube videos with scene metadata):",
             "    docs/training.md writes it out as such a folder",
             "  or manifests you made: python train.py teacher ... ; python train.py --train t.jsonl --val v.jsonl"]
    if size == "tiny":
        lines.append("  toy clips to try it on: python -m toy.world clips --split train --n 200 --out data/toy/clips")
    lines.append(f"  the {size} preset expects {HARDWARE.get(size, 'a CUDA GPU')}")
    print("\n".join(lines), file=sys.stderr)
    raise SystemExit(2)


def given_flags(argv) -> set[str]:
    """The options the command line itself sets (for the preset's printout)."""
    p = train_parser()
    for a in p._actions:
        a.default = argparse.SUPPRESS
    ns, _ = p.parse_known_args(argv)
    return set(vars(ns))


def teacher_main(argv):
    p = argparse.ArgumentParser(prog="train.py teacher", description=teacher.__doc__)
    add_model_args(p)
    p.add_argument("--manifest", required=True, help="input manifest (its target_text is replaced)")
    p.add_argument("--out", required=True, help="output manifest; rerun the same command to resume")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    if not Path(args.manifest).is_file():
        fail(f"manifest {args.manifest} not found")
    for name in ("batch", "max_new_tokens", "frames"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    teacher(args)


def cli(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["teacher"]:
        return teacher_main(argv[1:])
    p = train_parser()
    first, _ = p.parse_known_args(argv)
    toy = (first.size or "tiny") == "tiny" and first.model is None
    args = parse_with_recipe(p, argv, TOY_RECIPE if toy else None)
    args.out = args.out or str(Path("runs") / (Path(args.model).name if args.model else args.size or "tiny"))
    run, given = Path(args.out), given_flags(argv)
    if run.exists() and not run.is_dir():
        fail(f"--out {run} exists and is not a folder")
    found, problems = run_checkpoints(run)
    exists = any((run / n).exists() for n in ("latest", "latest.old", "best"))
    resume = args.resume or (args.videos is not None and exists)  # --videos: a rerun goes on where it stopped
    saved, defaults = {}, {}
    if resume:
        if not found:
            fail(f"nothing to resume in {run} ({'; '.join(problems) if problems else 'no latest/ checkpoint'})")
        for problem in problems:
            print(f"warning: {problem}; resuming from {found[0][0].name}/", file=sys.stderr)
        # The saved arguments become the defaults, so only what is given again on the command line changes.
        saved = {k: v for k, v in found[0][1]["args"].items() if k in vars(args) and k not in ("stop_at", "resume")}
        defaults = {k: p.get_default(k) for k in saved}
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        args.out = str(run)
        changed = [f"--{f.replace('_', '-')} {getattr(args, f)} (the run's: {saved[f]})" for f in ARCH_FLAGS
                   if f in saved and getattr(args, f) != saved[f]]
        if changed:
            fail(f"--resume keeps the run's architecture, and {', '.join(changed)} would change it: drop the flag, "
                 f"or start a new --out")
    elif exists:
        fail(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    if args.train is None and args.videos is None:
        no_data(args)
    check_numbers(args)
    if args.videos is None:
        for name in ("train", "val"):
            f = getattr(args, name)
            if f is not None and not Path(f).is_file():
                fail(f"--{name} manifest {f} not found")
    sources = {k: "the command line" if k in given else "the resumed run" for k in vars(args)
               if k in given or (k in saved and saved[k] != defaults[k])}
    fresh = not run.exists()
    try:
        return train(args, found if resume else None, sources)
    except BaseException:
        # A new run that failed before it saved anything (no checkpoint, no data stage) leaves no folder behind.
        if fresh and run.is_dir() and not any((run / n).exists() for n in ("latest", "latest.old", "best", "data")):
            shutil.rmtree(run, ignore_errors=True)
        raise


def main(argv=None):
    """The command, callable from Python: returns the run's final state; a user's mistake is SystemExit("error:
    ..."), a signal Stopped after the save. As a script, adapter.run_cli turns those into an exit status."""
    return cli(argv)


if __name__ == "__main__":
    run_cli(main)
