"""hhh's DPO, GRPO and PPO against TRL's DPOTrainer, GRPOTrainer and PPOTrainer: seconds per step, throughput,
peak memory and the share of the machine's fp32 matmul peak.

Same machine, same session, same bundled model (fp32), same LoRA (r 16, alpha 32, top 10 layers, the
modules hhh adapts), same data, same step sizes:
  DPO   8 pairs per step, beta 0.1; TRL computes reference log-probs every step (its default), hhh once
        per minibatch before training (that pass is counted in hhh's time)
  GRPO  16 completions per step (4 prompts x 4), 48 new tokens at temperature 0.7, beta 0.04, reward
        1 - P(offensive) on the red-team train prompts; sampling is part of each step for both
  PPO   16 completions per step, 48 new tokens at temperature 0.7, 2 PPO epochs of 2 minibatches, KL coefficient
        0.05; TRL 1.12.0's PPOTrainer (the last TRL release with PPO, trl.experimental.ppo; installed by
        `make bench-trl` into .bench/trl-1.12 and put first on the path of its worker only). TRL's PPO needs a
        value model and a reward model: its value model is the bundled model with a scalar head (its design: a
        second network, trained whole), its reward model a 2-layer scorer on the same vocabulary (negligible next
        to the policy); hhh's critic is a value head on the policy's hidden state and its reward 1 - P(offensive)
Each run is its own process, so peak memory (max RSS, model load included) is its own. The first step of each is
warm-up and not timed; the time is the median of the others. With --flops each trainer runs a second time under
torch's FlopCounterMode (matmuls and attention, forward and backward, as executed: FLOPs per step) and the share
of the peak is FLOPs per step / the timed run's seconds per step; the peak is the best 2048^3 fp32 matmul on the
same threads in the same run. Prints one line per run and the hhh/TRL ratios; with --write also
bench/results/latest.{md,json}.

    make bench-trl          # installs trl==1.16.0 (--no-deps) into .venv and trl==1.12.0 beside it, runs this
    .venv/bin/python bench/vs_trl.py [--dpo-steps 4] [--grpo-steps 4] [--ppo-steps 4] [--flops] [--write]
"""

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

MODEL = "bundled:smollm2-135m-instruct"
WORDS = ("the a you I we it is not can will help please sorry people think know good bad right wrong "
         "never always maybe really just like want need say tell make").split()


def pairs(n: int) -> list[dict]:
    """n prompt/chosen/rejected rows: red-team train prompts, random-word answers of ~40 words (~50 tokens)."""
    from hhh.data import load_prompts

    rng = random.Random(0)
    prompts = load_prompts("redteam:train")[:n]
    return [{"prompt": p, "chosen": " ".join(rng.choice(WORDS) for _ in range(40)),
             "rejected": " ".join(rng.choice(WORDS) for _ in range(40))} for p in prompts]


def lora(model):
    from hhh.config import PolicyJobSettings
    from hhh.models.load import lora_config

    return lora_config(model, PolicyJobSettings().lora())


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


TRL_PPO = Path(__file__).resolve().parent.parent / ".bench" / "trl-1.12"


def step_timer():
    """A TrainerCallback recording each step's wall time, from the end of the step before (TRL's PPOTrainer calls
    only on_step_end; the first step is timed from the start of training)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        times: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.time()

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            self.times.append(now - self.last)
            self.last = now

    return Timer()


FLOPS = {"count": 0.0, "seconds": 0.0}


@contextmanager
def counted():
    """With --flops (HHH_BENCH_FLOPS=1 in the worker): count the FLOPs the block executes and its wall time (into
    FLOPS). The counter sees every op through Python, which slows the step, so a run that counts is not the run
    that is timed."""
    if os.environ.get("HHH_BENCH_FLOPS") != "1":
        yield
        return
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    t0 = time.time()
    with mode:
        yield
    FLOPS["count"] += mode.get_total_flops()
    FLOPS["seconds"] += time.time() - t0


def timed(step_s: list[float]) -> dict:
    """Median seconds per step after the first (warm-up)."""
    if len(step_s) < 2:
        raise SystemExit("need at least 2 steps (the first is a warm-up)")
    return {"s_per_step": statistics.median(step_s[1:]), "steps": len(step_s)}


def toxicity_reward():
    from hhh.rewards import build_reward

    reward = build_reward("toxicity")

    def score(prompts, completions, **kw):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        plain = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return reward.score(plain, texts).tolist()

    return score


def trl_dpo(steps: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from hhh.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs(8 * steps)]
    timer = step_timer()
    args = DPOConfig(output_dir="/tmp/bench-trl-dpo", per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=5e-4, beta=0.1, report_to="none", save_strategy="no", logging_steps=1,
                     use_cpu=True, bf16=False, dataloader_num_workers=0, max_length=256)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora(model), callbacks=[timer])
    with counted():
        trainer.train()
    return {**timed(timer.times), "units_per_step": 8}


def hhh_dpo(steps: int) -> dict:
    from rich.console import Console

    from hhh.config import DPOConfig
    from hhh.data.pairs import Pairs
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.runs import RunDir
    from hhh.train.dpo import train_dpo

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    rows = pairs(8 * steps)
    data = Pairs([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                 [False] * len(rows), [None] * len(rows))
    config = DPOConfig(batch_size=8, epochs=1, lr=5e-4, beta=0.1, out="/tmp/bench-hhh-dpo",
                       share_prompt=worker_share_prompt())
    run = RunDir.create("dpo", config, config.out, exist_ok=True)
    (run.path / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    with counted():
        train_dpo(config, run, data, base=model, tokenizer=tok, console=Console(quiet=True))
    total = time.time() - t0
    step_s = [m["time/step_s"] for m in run.metrics()]
    # the reference pass spread over the steps + the median step: what a user waits for per step
    reference = total - sum(step_s)
    return {"s_per_step": statistics.median(step_s[1:]) + reference / steps,
            "s_per_step_steps_only": statistics.median(step_s[1:]), "steps": steps, "units_per_step": 8}


def trl_grpo(steps: int) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from hhh.data import load_prompts
    from hhh.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in load_prompts("redteam:train")[: 4 * steps]]
    timer = step_timer()
    args = GRPOConfig(output_dir="/tmp/bench-trl-grpo", per_device_train_batch_size=16, num_generations=4,
                      steps_per_generation=1, max_completion_length=48, temperature=0.7, beta=0.04,
                      learning_rate=1e-3, max_steps=steps, report_to="none", save_strategy="no", logging_steps=1,
                      use_cpu=True, bf16=False, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=toxicity_reward(), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora(model),
                          callbacks=[timer])
    with counted():
        trainer.train()
    return {**timed(timer.times), "units_per_step": 16}


def hhh_grpo(steps: int) -> dict:
    from rich.console import Console

    from hhh.config import GRPOConfig
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.runs import RunDir
    from hhh.train.grpo import train

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    config = GRPOConfig(steps=steps, prompts_per_step=4, group_size=4, minibatch_size=16, beta=0.04, lr=1e-3,
                        val_prompts=0, out="/tmp/bench-hhh-grpo", sampler_dtype=worker_sampler_dtype(),
                        share_prompt=worker_share_prompt())
    run = RunDir.create("grpo", config, config.out, exist_ok=True)
    (run.path / "metrics.jsonl").unlink(missing_ok=True)
    with counted():
        train(config, run, base=model, tokenizer=tok, console=Console(quiet=True))
    return {**timed([m["time/step_s"] for m in run.metrics()]), "units_per_step": 16}


def trl_ppo(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from hhh.data import load_prompts
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.spec import local_path
    from hhh.rollout import chat_prompt_ids

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    tok.padding_side = "left"
    value = AutoModelForSequenceClassification.from_pretrained(local_path(MODEL), num_labels=1)
    torch.manual_seed(0)
    small = LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id)
    scorer = LlamaForSequenceClassification(small)
    scorer.config.num_labels = 1
    scorer.score = torch.nn.Linear(64, 1, bias=False)
    prompts = load_prompts("redteam:train")[: 16 * steps]
    rows = [{"input_ids": ids} for ids in chat_prompt_ids(tok, prompts)]
    timer = step_timer()
    args = PPOConfig(output_dir="/tmp/bench-trl-ppo", per_device_train_batch_size=16, num_mini_batches=2,
                     num_ppo_epochs=2, gradient_accumulation_steps=1, total_episodes=16 * steps, response_length=48,
                     temperature=0.7, stop_token="eos", kl_coef=0.05, learning_rate=2e-3, vf_coef=0.1,
                     local_rollout_forward_batch_size=16, num_sample_generations=0, report_to="none",
                     save_strategy="no", logging_steps=1, use_cpu=True, bf16=False)
    trainer = PPOTrainer(args=args, processing_class=tok, model=model, ref_model=None, reward_model=scorer,
                         value_model=value, train_dataset=Dataset.from_list(rows), peft_config=lora(model),
                         callbacks=[timer])
    with counted():
        trainer.train()
    return {**timed(timer.times), "units_per_step": 16}


def hhh_ppo(steps: int) -> dict:
    from rich.console import Console

    from hhh.config import DetoxConfig
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.runs import RunDir
    from hhh.train.ppo import train

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    config = DetoxConfig(steps=steps, batch_size=16, minibatch_size=8, micro_batch_size=8, ppo_epochs=2,
                         max_new_tokens=48, temperature=0.7, kl_coef=0.05, lr=2e-3, reward="toxicity",
                         val_prompts=0, out="/tmp/bench-hhh-ppo", sampler_dtype=worker_sampler_dtype())
    run = RunDir.create("detox", config, config.out, exist_ok=True)
    (run.path / "metrics.jsonl").unlink(missing_ok=True)
    with counted():
        train(config, run, base=model, tokenizer=tok, console=Console(quiet=True))
    return {**timed([m["time/step_s"] for m in run.metrics()]), "units_per_step": 16}


def worker_sampler_dtype() -> str:
    """hhh's sampler_dtype inside a worker process: --sampler-dtype, handed over in the environment."""
    return os.environ.get("HHH_BENCH_SAMPLER_DTYPE", "weights")


def worker_share_prompt() -> bool:
    """hhh's share_prompt for its GRPO and DPO runs inside a worker process (off with --no-share-prompt)."""
    return os.environ.get("HHH_BENCH_SHARE_PROMPT", "1") == "1"


WORKERS = {"trl-dpo": trl_dpo, "hhh-dpo": hhh_dpo, "trl-grpo": trl_grpo, "hhh-grpo": hhh_grpo,
           "trl-ppo": trl_ppo, "hhh-ppo": hhh_ppo}
UNITS = {"dpo": "pairs", "grpo": "completions", "ppo": "episodes"}


def worker(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{cmd[-4:]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def cpu_name() -> str:
    """The CPU's model name (the machines these benchmarks run on differ from session to session)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def bf16_sampling(sampler_dtype: str) -> bool:
    """Whether hhh samples in bf16 under `sampler_dtype` here (auto: where the CPU multiplies bf16 natively)."""
    from hhh.models.load import cpu_has_native

    return sampler_dtype == "bfloat16" or (sampler_dtype == "auto" and cpu_has_native("bfloat16"))


def table(results: dict, peak: float, rollout_rows: list[dict] | None, sampler_dtype: str = "weights",
          share_prompt: bool = True) -> str:
    from hhh.models.load import cpu_has_native

    lines = [f"Machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, fp32 matmul peak "
             f"{peak / 1e9:.0f} GFLOP/s (measured in this run), native bf16 matmuls: "
             f"{'yes' if cpu_has_native('bfloat16') else 'no'}. Every model in fp32; hhh's sampler_dtype: "
             f"{sampler_dtype}; share_prompt: {'on' if share_prompt else 'off'}. Rollout rows in bfloat16: both "
             "samplers on a bf16 copy of the weights (hhh/HF fp32: hhh's bf16 tokens/s over fp32 `generate`'s).", "",
             "| method | TRL s/step | hhh s/step | TRL per s | hhh per s | hhh/TRL throughput | TRL peak GB | "
             "hhh peak GB | hhh/TRL memory | TRL % of peak | hhh % of peak |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in ("ppo", "grpo", "dpo"):
        t, h = results.get(f"trl-{task}"), results.get(f"hhh-{task}")
        if not t or not h:
            continue
        rate = lambda r: r["units_per_step"] / r["s_per_step"]  # noqa: E731
        share = lambda r: f"{r['peak_share']:.1%}" if "peak_share" in r else "-"  # noqa: E731
        lines.append(f"| {task.upper()} ({UNITS[task]}) | {t['s_per_step']:.2f} | {h['s_per_step']:.2f} | "
                     f"{rate(t):.2f} | {rate(h):.2f} | **{rate(h) / rate(t):.2f}x** | {t['peak_gb']:.2f} | "
                     f"{h['peak_gb']:.2f} | {h['peak_gb'] / t['peak_gb']:.2f}x | {share(t)} | {share(h)} |")
    if rollout_rows:
        lines += ["", "| rollout, batch | dtype | HF generate tokens/s | hhh tokens/s | hhh/HF | hhh/HF fp32 | "
                  "HF % of fp32 peak | hhh % of fp32 peak |", "|---|---|---|---|---|---|---|---|"]
        for r in rollout_rows:
            dtype = r.get("dtype", "float32")
            lines.append(f"| {r['batch']} | {dtype} | {r['hf_tok_s']:.0f} | {r['hhh_tok_s']:.0f} | "
                         f"**{r['ratio']:.2f}x** | {r.get('ratio_to_fp32_hf', r['ratio']):.2f}x | "
                         f"{r['hf_peak_fraction']:.1%} | {r['hhh_peak_fraction']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpo-steps", type=int, default=4)
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--ppo-steps", type=int, default=4)
    parser.add_argument("--only", default="ppo,grpo,dpo,rollout",
                        help="comma-separated of ppo, grpo, dpo, rollout, or single runs (hhh-grpo, trl-ppo...)")
    parser.add_argument("--sampler-dtype", default="weights", choices=("weights", "bfloat16", "auto"),
                        help="hhh's sampler_dtype for its GRPO and PPO runs (the weights stay float32)")
    parser.add_argument("--no-share-prompt", action="store_true",
                        help="hhh's GRPO and DPO take one row per completion (share_prompt off), to time the layouts")
    parser.add_argument("--flops", action="store_true", help="run each trainer again under a FLOP counter")
    parser.add_argument("--write", action="store_true", help="write bench/results/latest.md and latest.json")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = {"dpo": args.dpo_steps, "grpo": args.grpo_steps, "ppo": args.ppo_steps}
    if args.worker:
        n = steps[args.worker.split("-")[1]]
        result = WORKERS[args.worker](n)
        flops = {"flops_per_step": FLOPS["count"] / n} if FLOPS["seconds"] else {}
        print("RESULT " + json.dumps({**result, **flops, "peak_gb": peak_gb()}))
        return
    only = [x.strip() for x in args.only.split(",")]
    import torch
    from rollout import matmul_peak  # bench/rollout.py, beside this script

    peak = matmul_peak(torch.get_num_threads())
    results: dict = {}
    names = [n for n in WORKERS if n.split("-")[1] in only or n in only] + (["rollout"] if "rollout" in only else [])
    for name in names:
        env = {**os.environ, "HHH_BENCH_SAMPLER_DTYPE": args.sampler_dtype,
               "HHH_BENCH_SHARE_PROMPT": "0" if args.no_share_prompt else "1"}
        if name == "trl-ppo":
            if not (TRL_PPO / "trl").is_dir():
                sys.exit(f"TRL 1.12.0 is not in {TRL_PPO}: make bench-trl installs it")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRL_PPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, __file__, "--worker", name, *(f"--{k}-steps={v}" for k, v in steps.items())]
        if name == "rollout":  # hhh's sampler vs transformers' generate, its own script
            cmd = [sys.executable, str(Path(__file__).with_name("rollout.py")), "--json"]
            if bf16_sampling(args.sampler_dtype):  # its samplers in bf16 too, beside fp32
                cmd.append("--dtypes=float32,bfloat16")
        results[name] = worker(cmd, env)
        r = results[name]
        if name == "rollout":
            print("rollout  " + ", ".join(f"batch {x['batch']} {x['dtype']}: {x['ratio']:.2f}x" for x in r["rows"]),
                  flush=True)
            continue
        if args.flops:  # a second, shorter run under the counter (2 steps: FLOPs per step)
            short = [*cmd[:4], *(f"--{k}-steps=2" for k in steps)]
            r["flops_per_step"] = worker(short, {**env, "HHH_BENCH_FLOPS": "1"})["flops_per_step"]
            r["peak_share"] = r["flops_per_step"] / r["s_per_step"] / peak
        share = f"  {r['peak_share']:.1%} of the matmul peak" if "peak_share" in r else ""
        print(f"{name:9s} {r['s_per_step']:6.2f} s/step  peak {r['peak_gb']:.2f} GB{share}  ({r['steps']} steps)",
              flush=True)
    text = table(results, peak, results.get("rollout", {}).get("rows"), args.sampler_dtype, not args.no_share_prompt)
    print(text)
    if args.write:
        out = Path(__file__).with_name("results")
        out.mkdir(exist_ok=True)
        (out / "latest.md").write_text(text + "\n")
        import torch
        import transformers

        (out / "latest.json").write_text(json.dumps({
            "machine": {"processor": cpu_name(), "cores": os.cpu_count(),
                        "platform": platform.platform(), "matmul_peak_flops": peak},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "settings": {**steps, "sampler_dtype": args.sampler_dtype}, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
