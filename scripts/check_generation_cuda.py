"""Generation on a GPU: minigpt2 on cuda against transformers on cuda, assisted decoding on cuda.

    python scripts/check_generation_cuda.py            # on a machine with CUDA (DEV=cpu runs it on the CPU)
    python scripts/check_generation_cuda.py --compile  # the same checks through compile=True (CUDA graphs)

The test suite runs on CPU only (CI has no GPU); this script is the GPU counterpart of the
generation parity tests: seeded sampling with the new warpers, beam search and its scores,
right padding, stream log-probs, a CUDA generator, assisted decoding's greedy identity (an
assistant, prompt lookup, early exit, the model itself), speculative sampling and bf16 weights.
It prints PASS / FAIL per check and a summary line.
"""
import argparse, os, sys, time, tempfile, warnings, traceback
# Arguments first, so --help answers on any machine before torch is even imported.
_parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                  epilog="Needs a CUDA GPU unless --device cpu (or DEV=cpu) is given.")
_parser.add_argument("--device", default=os.environ.get("DEV", "cuda"), help="cuda (default) or cpu; env DEV sets it too")
_parser.add_argument("--compile", action="store_true",
                     help="load minigpt2's models with compile=True: on CUDA every check runs the CUDA-graph step")
_args = _parser.parse_args()
dev = _args.device
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.getcwd())
import torch, transformers
if dev.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("check_generation_cuda.py: needs a CUDA GPU (none found); --device cpu runs it on the CPU")
import minigpt2
from minigpt2 import assisted
print("torch", torch.__version__, "transformers", transformers.__version__, "device", dev, "compile", _args.compile,
      torch.cuda.get_device_name(0) if dev == "cuda" else "")
results = {}
# minigpt2 follows transformers 5.24 where transformers itself changed after 5.17 (seen: 5.17
# differs on these two on CPU and CUDA alike, 5.24 agrees); with an older transformers installed
# (a GPU image's own, say) these checks are run and reported, not counted.
TF = tuple(int(x) for x in transformers.__version__.split(".")[:2])
CHANGED_IN_5_24 = {
    "parity max_new_tokens=10,num_beams=3,do_sample=True":
        "5.24 sorts the sampled beam candidates by log-prob (_get_top_k_continuations), 5.17 did not",
    "parity max_new_tokens=10,forced_eos_token_id=4,min_length=12,exponential_decay_length_penalty=(2, 1.5),renormalize_logits=True":
        "5.24's ExponentialDecayLengthPenalty leaves a -inf EOS logit alone; 5.17 made it -inf + inf = NaN (token 0)",
}
def check(name, fn):
    try:
        ok = fn()
        if not ok and TF < (5, 24) and name in CHANGED_IN_5_24:
            print(f"KNOWN {name}: transformers {transformers.__version__} < 5.24: {CHANGED_IN_5_24[name]}", flush=True)
            return
        results[name] = bool(ok)
        print(("PASS " if ok else "FAIL ") + name, flush=True)
    except Exception as e:
        results[name] = False
        print("ERROR " + name + ": " + "".join(traceback.format_exception_only(type(e), e)).strip(), flush=True)

def build(d, seed, **cfg):
    torch.manual_seed(seed)
    kw = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=999, eos_token_id=999, initializer_range=0.2)
    kw.update(cfg)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "ln_" in n or n.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    hf.save_pretrained(d)
    return hf.eval().to(dev)

tmp = tempfile.mkdtemp()
hf = build(f"{tmp}/t", 3); hfa = build(f"{tmp}/a", 5, n_layer=1)
m = minigpt2.GPT2.from_pretrained(f"{tmp}/t", device=dev, compile=_args.compile)
a = minigpt2.GPT2.from_pretrained(f"{tmp}/a", device=dev, compile=_args.compile)
ids = torch.randint(0, 998, (3, 6), generator=torch.Generator().manual_seed(0)).to(dev)
ones = torch.ones_like(ids)
def same(kw, seed=0, mask=None, x=ids):
    torch.manual_seed(seed); o = m.generate(x, mask, **kw)
    torch.manual_seed(seed); t = hf.generate(x, attention_mask=ones if mask is None else mask, **kw)
    if o.shape != t.shape or not torch.equal(o, t):
        print("   ours", o.tolist(), "\n   theirs", t.tolist())
        return False
    return True
for kw in [dict(max_new_tokens=10), dict(max_new_tokens=10, do_sample=True), dict(max_new_tokens=10, do_sample=True, min_p=0.1, top_k=0),
           dict(max_new_tokens=10, do_sample=True, typical_p=0.7), dict(max_new_tokens=10, do_sample=True, epsilon_cutoff=0.01, top_k=0),
           dict(max_new_tokens=10, do_sample=True, eta_cutoff=0.01, top_k=0), dict(max_new_tokens=10, num_beams=3),
           dict(max_new_tokens=10, num_beams=3, do_sample=True), dict(max_new_tokens=10, bad_words_ids=[[5], [7, 8]], sequence_bias={(9,): 2.0}, suppress_tokens=[1], repetition_penalty=1.3),
           dict(max_new_tokens=10, forced_eos_token_id=4, min_length=12, exponential_decay_length_penalty=(2, 1.5), renormalize_logits=True)]:
    check("parity " + ",".join(f"{k}={v}" for k, v in kw.items()), lambda kw=kw: same(kw, seed=1))
mask = torch.tensor([[1]*6, [1]*3 + [0]*3, [1]*4 + [0]*2], device=dev)
check("right padding greedy", lambda: same(dict(max_new_tokens=8), mask=mask))
check("right padding sampling", lambda: same(dict(max_new_tokens=8, do_sample=True), seed=2, mask=mask))
lmask = torch.flip(mask, [1])
check("left padding beams", lambda: same(dict(max_new_tokens=8, num_beams=2), mask=lmask))
def scores():
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True, output_logits=True)
    o = m.generate(ids, **kw); t = hf.generate(ids, attention_mask=ones, **kw)
    ok = torch.equal(o.sequences, t.sequences) and torch.equal(o.beam_indices, t.beam_indices) and torch.allclose(o.sequences_scores, t.sequences_scores, atol=1e-4)
    ok = ok and all(torch.allclose(x, y, atol=1e-3) for x, y in zip(o.scores, t.scores))
    ts = m.compute_transition_scores(o.sequences, o.scores, o.beam_indices); tt = hf.compute_transition_scores(t.sequences, t.scores, t.beam_indices)
    return ok and torch.allclose(ts, tt, atol=1e-3)
check("beam scores + transition scores", scores)
def gen_cuda():
    g = torch.Generator(device=dev).manual_seed(7)
    o1 = m.generate(ids, max_new_tokens=8, do_sample=True, generator=g)
    torch.manual_seed(7)
    t = hf.generate(ids, attention_mask=ones, max_new_tokens=8, do_sample=True)
    return torch.equal(o1, t)
check("cuda generator = global seed", gen_cuda)
def stream_lp():
    torch.manual_seed(3); steps = list(m.stream(None, ids, max_new_tokens=5, do_sample=True, logprobs=3))
    torch.manual_seed(3); t = hf.generate(ids, attention_mask=ones, max_new_tokens=5, do_sample=True, return_dict_in_generate=True, output_logits=True)
    return all(torch.allclose(s.top_logprobs, torch.topk(torch.log_softmax(l, -1), 3).values, atol=1e-4) for s, l in zip(steps, t.logits))
check("stream logprobs", stream_lp)
for name, kw in [("assistant", dict(assistant_model=a)), ("assistant k=4", dict(assistant_model=a, num_assistant_tokens=4, assistant_confidence_threshold=0.0)),
                 ("prompt lookup", dict(prompt_lookup_num_tokens=3)), ("early exit", dict(assistant_early_exit=1, assistant_confidence_threshold=0.0)),
                 ("self", dict(assistant_model=m, assistant_confidence_threshold=0.0, num_assistant_tokens=5))]:
    def run(kw=kw):
        ok = True
        for s in range(3):
            x = ids[s:s+1]
            ref = m.generate(x, max_new_tokens=20, eos_token_id=None)
            out, st = assisted.generate_with_stats(m, x, max_new_tokens=20, eos_token_id=None, **kw)
            ok = ok and torch.equal(out, ref)
        print(f"   acceptance {st.acceptance_rate:.2f}")
        return ok
    check("assisted greedy identity " + name, run)
check("assisted vs transformers assisted", lambda: torch.equal(m.generate(ids[:1], max_new_tokens=12, assistant_model=a), hf.generate(ids[:1], attention_mask=ones[:1], max_new_tokens=12, assistant_model=hfa)))
def spec():
    torch.manual_seed(0)
    for s in range(20):
        m.generate(ids[:1], max_new_tokens=6, do_sample=True, assistant_model=a, assistant_confidence_threshold=0.0, num_assistant_tokens=3)
    return True
check("speculative sampling runs", spec)
# bf16 weights on cuda: generation runs, greedy equals fp32 top-1 mostly
def bf16():
    mb = minigpt2.GPT2.from_pretrained(f"{tmp}/t", device=dev, dtype="bfloat16", compile=_args.compile)
    out = mb.generate(ids, max_new_tokens=5, assistant_early_exit=1, assistant_confidence_threshold=0.0) if False else mb.generate(ids, max_new_tokens=5)
    o2 = mb.generate(ids[:1], max_new_tokens=8, assistant_early_exit=1, assistant_confidence_threshold=0.0)
    return out.shape == (3, 11) and torch.equal(o2, mb.generate(ids[:1], max_new_tokens=8))
check("bf16 cuda generate + assisted identity", bf16)
print("SUMMARY", sum(results.values()), "/", len(results), "passed")
