"""Which runs of a partly lowerable model are worth a plan? (gpuconv/compiler.py, _worth_a_plan)

Training steps (forward, cross-entropy, backward, SGD) at batch 128 of SimpleCNN (three
conv -> BatchNorm2d -> pool -> ReLU blocks: the BatchNorms run eagerly) and of LeNet-5 with a
Dropout(0.5) after fc1 and fc2 (training mode: the Dropouts run eagerly), each under every rule,
interleaved round by round within each model's group (see groups()) so that a change in the
machine's load hits all alike:

  eager    the uncompiled model, op by op
  conv     a plan for each run that holds a Conv2d, the dense tail eagerly
  fused    a plan for each run that holds a Conv2d followed by [ReLU ->] MaxPool2d(k, stride k)
           (the plan's conv-pool fusion); SimpleCNN has none (its BatchNorm sits between)
  every    a plan for every run, the Flatten-Linear-ReLU-Linear tail too
  LeNet-5  old vs new: the whole-chain case through this version's CompiledModel and the one before
           partial lowering (loaded from git as `old_compiler`), to see the cost of the segments'
           bookkeeping on a model that lowers whole

Run: python docs/experiments/partial_lowering.py [rounds] [old compiler.py path]
Prints the median and the quartiles of each variant's step in milliseconds.
"""
import importlib.util
import sys
import time

import numpy as np

import gpuconv
from gpuconv import compiler, nn
from gpuconv.models import LeNet5, SimpleCNN
from timing import sgd_step


def load_old_compiler(path):
    from gpuconv.nn import cpu_plan
    if not hasattr(cpu_plan, "chain"):  # gone with partial lowering (the old compiler was its one user): as it was
        def chain(model):
            layers = cpu_plan.steps(model)
            for layer in layers:
                if type(layer) not in cpu_plan.LOWERINGS:
                    raise cpu_plan.Unsupported(f"{type(layer).__name__} (its forward is Python the executor cannot lower)")
            return layers
        cpu_plan.chain = chain
    spec = importlib.util.spec_from_file_location("gpuconv._old_compiler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fused_conv(layers):
    """A Conv2d followed by [ReLU ->] MaxPool2d(k, stride k): the plan's conv-pool fusion."""
    for i, layer in enumerate(layers):
        if type(layer) is nn.Conv2d:
            rest = layers[i + 1:i + 3]
            rest = rest[1:] if rest and type(rest[0]) is nn.ReLU else rest
            if rest and type(rest[0]) is nn.MaxPool2d and rest[0].stride == rest[0].kernel_size:
                return True
    return False


RULES = {
    "none": lambda layers, whole: whole,  # partial runs all eager
    "conv": lambda layers, whole: whole or any(type(layer) is nn.Conv2d for layer in layers),
    "fused": lambda layers, whole: whole or _fused_conv(layers),
    "every": lambda layers, whole: True,
}


def compiled_with(model, rule):
    net = gpuconv.compile(model)
    kept = compiler._worth_a_plan
    compiler._worth_a_plan = RULES[rule]
    try:
        net._current_segments()  # cached while the layers' modes stay
    finally:
        compiler._worth_a_plan = kept
    return net


def lenet_dropout(seed):
    """LeNet-5 with Dropout(0.5) after fc1 and fc2, in training mode: the conv blocks lower, the
    Dropouts run eagerly."""
    model = LeNet5(seed=seed)
    layers = [(name, layer) for name, layer in model.named_children()]
    out = nn.Sequential()
    for name, layer in layers:
        out.add(name, layer)
        if name in ("act3", "act4"):
            out.add("drop" + name[-1], nn.Dropout(0.5, seed=seed))
    return out


def groups(x, labels, old_path):
    """Each group's variants, timed together: a worker process keeps the arenas of at most
    cpu_workers.MAX_PLANS (8) plans, and all variants at once hold 14, which would set every plan
    up again each round (a cost eager runs never pay)."""
    for name, make in (("SimpleCNN", SimpleCNN), ("LeNet-5+Dropout", lenet_dropout)):
        variants = {}
        model = make(seed=1)
        variants[f"{name} eager"] = sgd_step(model, model, x, labels)
        for rule in ("conv", "fused", "every"):
            model = make(seed=1)
            variants[f"{name} {rule}"] = sgd_step(compiled_with(model, rule), model, x, labels)
        yield variants
    variants = {}
    model = LeNet5(seed=1)
    variants["LeNet-5 new"] = sgd_step(gpuconv.compile(model), model, x, labels)
    if old_path:
        model = LeNet5(seed=1)
        variants["LeNet-5 old"] = sgd_step(load_old_compiler(old_path).compile(model), model, x, labels)
    yield variants


def main(rounds=30, old_path=None):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, 128)
    for variants in groups(x, labels, old_path):
        times = {name: [] for name in variants}
        for step in variants.values():  # warm up: compile, lay out, start the workers
            step(), step()
        for _ in range(rounds):
            for name, step in variants.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            q1, median, q3 = np.percentile(np.array(values) * 1e3, [25, 50, 75])
            print(f"{name:<24} median {median:7.2f} ms  (quartiles {q1:.2f}-{q3:.2f}), {rounds} steps")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30, sys.argv[2] if len(sys.argv) > 2 else None)
