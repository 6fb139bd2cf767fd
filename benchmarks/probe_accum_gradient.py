import sys, json, dataclasses, torch
from bndoctor.bench import runner
from bndoctor.bench.scenarios import SCENARIOS
mode, seeds, epochs = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
base = sys.argv[4] if len(sys.argv) > 4 else "m1d-accbn-renorm-2x32-corr"
sc = dataclasses.replace(SCENARIOS[base], accum_bn=mode, epochs=epochs)
for seed in seeds:
    r, _ = runner.run_scenario(sc, seed)
    print(json.dumps({"mode": mode, "base": base, "seed": seed, "final": r.final_acc, "val": [round(v, 3) for v in r.val_acc]}), flush=True)
