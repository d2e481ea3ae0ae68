"""`edge-dlm doctor`: which engines, devices, kernels and quantizers can run here, and why not."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="artifact or checkpoint directory to check the engines against "
                   "(default: the bundled demo model)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def report(model: str | None) -> dict:

    import torch

    from edge_dlm import engines, kernels
    from edge_dlm.session.calibrate import artifact_dir, load_table, onnx_candidate, table_key, target
    from edge_dlm.session.load import ENGINE_RULE
    from edge_dlm.hub import resolve
    from edge_dlm.primitives.errors import install_hint
    from edge_dlm.primitives.machine import measured_threads, threads_for
    from edge_dlm.primitives.power import PowerSupply, Sampler
    from edge_dlm.model.weights import check_dir
    from edge_dlm.primitives.fsutil import set_aside_files

    path = check_dir(resolve(model))
    devices = ["cpu"] + ([f"cuda ({torch.cuda.get_device_name(0)})"] if torch.cuda.is_available() else [])
    rows = []
    for name in engines.ORDER:
        mod = engines.module(name)
        for dev in devices:
            dev_id = dev.split(" ")[0]
            reasons = mod.availability(path, dev_id)
            rows.append({"engine": name, "device": dev, "ok": not reasons, "reasons": reasons,
                         "versions": mod.versions()})
    k_dev = "cuda" if torch.cuda.is_available() else "cpu"
    k_ok, k_reasons = kernels.status(k_dev)
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    # the table `--mode auto` uses with the default load options
    defaults = argparse.Namespace(model=str(path), device="auto", dtype="auto", quant=None, group_size=64,
                                  no_lora=False, kernels="auto", engine="auto")
    t = target(defaults)
    key = table_key(t)
    table = load_table(key)
    built = (artifact_dir(key) / "manifest.json").exists()
    return {"engine_rule": ENGINE_RULE, "auto_built_onnx": {
                "path": str(artifact_dir(key)), "built": built,
                "why_not": None if (path / "model.onnx").exists() else onnx_candidate(t, "torch")},"calibration": table.to_json() if table else None,
            "power": {"energy": Sampler(devices[-1].split(" ")[0]).label, "supply": PowerSupply().state().label},
            "model": str(path), "python": platform.python_version(), "torch": torch.__version__,
            "threads": threads_for(None), "threads_measured": measured_threads(),
            "compiled_passes": compiled_report(k_dev),
            "set_aside": [str(f) for f in set_aside_files()],
            "cpu_kernels": cpu_kernels_report(),
            "cuda": torch.version.cuda, "engines": rows,
            "auto": next((r["engine"] for r in rows if r["ok"]), None),
            "kernels": {"device": k_dev, "ok": k_ok, "reasons": k_reasons},
            "quantization": {"int8/int4 (torch)": [], "nf4/llm-int8 (bitsandbytes)":
                             [] if bnb else [f"bitsandbytes is not installed ({install_hint('quant')})"]}}


def compiled_report(device: str) -> str:
    """Whether `--compile on` can run here and what `--compile auto` does."""
    from edge_dlm.model import compiled

    why = compiled.available(device)
    if why:
        return f"not here: {why[0]}"
    from edge_dlm.model.store import compiled_cache

    steps = compiled_cache() / "steps"
    kept = sum(1 for _ in steps.glob("*/*.step")) if steps.is_dir() else 0
    return ("torch.compile can run here; --compile auto compiles a model once `edge-dlm calibrate` has compiled "
            "and measured it faster on this machine (a one-shot generate only where its tokens pay back a compiled "
            f"start); a process compiles at most {compiled.shape_limit()} pass shapes per model, each in the "
            "background (new shapes run eagerly meanwhile, and for good past the bound or after a failed compile; "
            f"`serve` logs the count); {kept} compiled pass shapes kept in {steps} load in a new process")


def cpu_kernels_report() -> str:
    from edge_dlm.kernels import cpu_build

    why = cpu_build.available()
    if why:
        return f"not here ({why[0]}); the reference serves"
    from edge_dlm import kernels

    if kernels.choice() == "off":
        return f"off ({kernels.ENV}=off); the reference serves"
    if not cpu_build.usable():
        return f"the build failed: {cpu_build.failure()}; the reference serves"
    name = {512: "AVX-512", 256: "AVX2", 128: "NEON dot product", 0: "portable C"}
    width = cpu_build.simd()
    bf16 = f"bf16 {name[width['bf16']]}" if width["bf16"] else "bf16 through torch (no vector path here)"
    ops = (f"C++ operators ({cpu_build._BOUND.ops_origin})" if cpu_build.cpp_operators()
           else "Python operators (none built for this torch and no C++ compiler: ~3 us more a call)")
    variant, why = cpu_build.variant()
    return f"the {variant} variant, {why}; int8 / int4 {name[width['int8 / int4']]}, {bf16}; {ops}, " \
        f"on {cpu_build.threads()}"


def run(a: argparse.Namespace) -> int:
    r = report(a.model)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    out = [f"edge-dlm doctor: {r['model']}", f"python {r['python']}, torch {r['torch']}, CUDA {r['cuda'] or 'none'}",
           f"CPU threads for passes: {r['threads']} ({threads_origin(r['threads_measured'])})",
           f"compiled passes (--compile): {r['compiled_passes']}",
           f"CPU int8 / int4 / bf16 matmul kernels: {r['cpu_kernels']}", "",
           f"{'engine':<12} {'device':<28} {'status':<6} versions / why not"]
    for row in r["engines"]:
        ver = ", ".join(f"{k} {v}" for k, v in row["versions"].items()) or "-"
        out.append(f"{row['engine']:<12} {row['device']:<28} {'ok' if row['ok'] else 'no':<6} "
                   f"{ver if row['ok'] else '; '.join(row['reasons'])}")
    built = r["auto_built_onnx"]
    out.append(f"\nthe engine rule: {r['engine_rule']}")
    out.append(f"--engine auto loads: {r['auto'] or 'nothing (see above)'}; the ONNX engine auto builds for it: "
               + ("built (" + built["path"] + ")" if built["built"] else
                  "not built yet" + (f" and not built here: {built['why_not']}" if built["why_not"] else
                                     " (edge-dlm calibrate builds and measures it)")))
    k = r["kernels"]
    out.append(f"Triton kernels on {k['device']}: {'ok' if k['ok'] else 'no: ' + '; '.join(k['reasons'])}")
    for scheme, why in r["quantization"].items():
        out.append(f"quantization {scheme}: {'ok' if not why else 'no: ' + why[0]}")
    out.append(f"energy meter: {r['power']['energy']}; power supply: {r['power']['supply']}")
    if r["set_aside"]:
        out.append(f"set aside as damaged (kept for a look, never read again; delete them when done): "
                   f"{', '.join(r['set_aside'])}")
    else:
        out.append("set aside as damaged: nothing (caches and the chat database read back whole)")
    if r["calibration"]:
        from edge_dlm.session.calibrate import Table, choose

        table = Table.from_json(r["calibration"])
        out += ["", table.format(), choose(table)[1]]
    else:
        out.append("\ncalibration: none yet for this model and machine (edge-dlm calibrate, or a chat in --mode auto, measures it)")
    print("\n".join(out))
    return 0


def threads_origin(measured: dict | None) -> str:
    """Where the threads count comes from, for doctor's line."""
    if os.environ.get("EDGE_DLM_THREADS"):
        return "$EDGE_DLM_THREADS; --threads overrides"
    if measured:
        speeds = ", ".join(f"{n}: {v[0]:.0f} / {v[-1]:.0f}" for n, v in measured["tokens_per_s"].items())
        return f"measured by `edge-dlm calibrate`, AR tok/s idle / beside a busy core: {speeds}; --threads overrides"
    return "half the CPUs; `edge-dlm calibrate` measures the best count here; --threads overrides"
