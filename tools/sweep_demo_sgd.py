"""Plain in-memory SGD on the demo task, to find settings before running the streamed demo.

    python tools/sweep_demo_sgd.py .cache/demo LR STEPS SEQ_LEN     # e.g. .cache/demo 0.01 40 128

Same data, packing, batches (8 x SEQ_LEN, seed 0) and schedule as configs/demo.yaml (4 warm-up steps, then
cosine), with torch.optim.SGD on the whole model in memory. Prints held-out (accuracy, choice loss) at step 0
and every 10 steps from 20. Measured: lr 0.01 -> 0.808 at 20, 0.818 at 40; lr 0.02 and 0.03 diverge (0.50).
"""
import sys, time, torch, json
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM
from lomo_runtime.data import load_examples, load_tokenizer, tokenize_examples, pack, Batches, pad_id_of
from lomo_runtime.evaluation import load_choice_examples, score_choices
d='.cache/smollm2-135m'; data=sys.argv[1]; lr=float(sys.argv[2]); steps=int(sys.argv[3]); seq=int(sys.argv[4])
tok=load_tokenizer(d)
ev=load_choice_examples(f'{data}/sentiment-eval.jsonl')
seqs=pack(tokenize_examples(load_examples(f'{data}/sentiment-train.jsonl'),tok),seq,pad_id=pad_id_of(tok))
b=Batches(seqs,8,seed=0)
m=AutoModelForCausalLM.from_pretrained(d)
opt=torch.optim.SGD(m.parameters(), lr=lr)
def ev_(): m.eval(); r=score_choices(m,tok,ev,16); m.train(); return round(r.accuracy,4), round(r.loss,4)
print(data, lr, seq, "step 0", ev_(), flush=True)
import math
for s in range(steps):
    ids,lab=next(b)
    cur = lr*min(1,(s+1)/4)*0.5*(1+math.cos(math.pi*max(0,s-4)/(steps-4))) if s>=4 else lr*(s+1)/4
    for g in opt.param_groups: g['lr']=cur
    loss=m(input_ids=ids,labels=lab).loss; loss.backward(); opt.step(); opt.zero_grad()
    if (s+1)%10==0 and s+1>=20: print(data, lr, "step", s+1, round(loss.item(),3), ev_(), flush=True)
