"""Decoding memory: peak memory while sampling frames from a long video vs the bytes of the frames returned.

Writes a synthetic clip with PyAV (libx264, 30 fps, one keyframe every 250 frames), then decodes it in a fresh
subprocess per setting and reports the growth of peak RSS over the subprocess's baseline (after imports).
If decoding held the whole video, peak growth would reach the full RGB size.

    python benchmarks/bench_decode.py --minutes 5
"""
from __future__ import annotations

import argparse, json, resource, subprocess, sys, tempfile, time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_video(path: Path, seconds: float, width: int, height: int, fps: int = 30):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "ultrafast", "g": "250"}
        ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
        for i in range(int(seconds * fps)):
            a = np.broadcast_to(ramp, (height, width, 3)).copy()
            a[:, (i * 4) % width] = 255                                     # a moving line: every frame differs
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def measure(path: str, max_frames: int, num_frames: int | None) -> dict:
    """Run in a child process: peak-RSS growth of one decode, in MiB."""
    sys.path.insert(0, str(ROOT))
    import data
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB -> MiB on Linux
    base = peak()
    t = time.perf_counter()
    clip = data.decode_video(path, num_frames=num_frames, max_frames=max_frames)
    secs = time.perf_counter() - t
    returned = sum(f.nbytes for f in clip.frames) / 2**20
    return {"frames": len(clip.frames), "total_frames": clip.total_frames, "returned_MiB": round(returned, 1),
            "peak_growth_MiB": round(peak() - base, 1), "seconds": round(secs, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="length of the synthetic video (default 5)")
    ap.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the synthetic video (default 1280x720)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:                                                    # internal: one measurement, JSON on stdout
        path, max_frames, num_frames = json.loads(args.child)
        print(json.dumps(measure(path, max_frames, num_frames)))
        return
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.mp4"
        t = time.perf_counter()
        write_video(path, args.minutes * 60, width, height)
        n = int(args.minutes * 60 * 30)
        print(f"wrote {args.minutes:g} min {width}x{height} ({n} frames, {path.stat().st_size / 2**20:.1f} MiB, "
              f"{n * width * height * 3 / 2**30:.1f} GiB as RGB) in {time.perf_counter() - t:.0f} s")
        for max_frames, num_frames in [(12, None), (64, None), (64, 256)]:
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([str(path), max_frames, num_frames])],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            mode = f"uniform {num_frames}" if num_frames else f"smolvlm max_frames={max_frames}"
            print(f"{mode:24s} {r['frames']:4d} frames  returned {r['returned_MiB']:7.1f} MiB  "
                  f"peak RSS growth {r['peak_growth_MiB']:7.1f} MiB  {r['seconds']:6.2f} s")


if __name__ == "__main__":
    main()
