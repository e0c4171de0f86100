"""Worker process for tests/test_checkpoint.py: saves or restores adapter checkpoints.

Usage:
  python checkpoint_worker.py save DIR          save steps 0..2 (max_to_keep=2), print checksums
  python checkpoint_worker.py restore DIR       restore the latest step against abstract targets
  python checkpoint_worker.py save-then-big DIR save step 1, print "saved 1", then a large step 2
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lrj
from lowrank_jax import checkpoint

PARAMS = {"params": {"q": {"kernel": jnp.ones((64, 32))}, "v": {"kernel": jnp.ones((64, 32))}}}
ADAPTER = lrj.lora(rank=4, alpha=8.0, targets=r".*/(q|v)/kernel")
OPT = optax.adamw(1e-3)


def trained(step):
    lp = ADAPTER.init(jax.random.key(0), PARAMS)
    lp = jax.tree.map(lambda x: x + step, lp)
    state = OPT.init(lp)
    _, state = OPT.update(jax.tree.map(jnp.ones_like, lp), state, lp)
    return lp, state


def checksum(tree):
    return float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree) if np.issubdtype(np.asarray(x).dtype, np.number)))


def main():
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "save":
        mngr = checkpoint.manager(directory, max_to_keep=2)
        sums = {}
        for step in range(3):
            lp, state = trained(step)
            checkpoint.save(mngr, step, lp, state, config=ADAPTER.config)
            sums[step] = [checksum(lp), checksum(state)]
        print(json.dumps({"steps": mngr.all_steps(), "sums": sums}))
    elif mode == "restore":
        mngr = checkpoint.manager(directory, max_to_keep=2)
        abstract_lp = jax.eval_shape(ADAPTER.init, jax.random.key(0), PARAMS)
        abstract_state = jax.eval_shape(OPT.init, abstract_lp)
        step, lp, state, config = checkpoint.restore(mngr, abstract_lp, abstract_state)
        assert jax.tree.structure(lp) == jax.tree.structure(abstract_lp)
        assert jax.tree.structure(state) == jax.tree.structure(abstract_state)
        print(json.dumps({"step": step, "sums": [checksum(lp), checksum(state)], "config": config}))
    elif mode == "save-then-big":
        mngr = checkpoint.manager(directory, max_to_keep=2)
        lp, state = trained(1)
        checkpoint.save(mngr, 1, lp, state, config=ADAPTER.config)
        print("saved 1", flush=True)
        big = {f"leaf{i}": jnp.full((1024, 1024), float(i)) for i in range(int(sys.argv[3]))}
        checkpoint.save(mngr, 2, big)
        print("saved 2", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
