"""``BilevelProblem(features=...)``: the problem with features is exactly the problem whose inner
objective folds them in, ``g(x, y, features(x, b))`` — every estimator returns the same
hypergradient for both forms (float64, to rounding) — and ITD/AID match finite differences."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

D = torch.float64
P, H, N = 3, 4, 6  # input size, feature size, support points


def features(x, batch):
    inputs, targets = batch
    return torch.tanh(inputs @ x["A"]), targets


def inner(x, y, batch):
    feats, targets = batch
    resid = feats @ y["w"] + y["b"] - targets
    return 0.5 * (resid ** 2).mean() + 0.5 * (torch.exp(x["c"]) * y["w"] ** 2).sum() + 0.05 * y["b"] ** 2


def outer(x, y, batch):
    inputs, targets = batch
    return 0.5 * ((torch.tanh(inputs @ x["A"]) @ y["w"] + y["b"] - targets) ** 2).mean()


def init(x):
    return {"w": x["w0"], "b": torch.zeros((), dtype=x["w0"].dtype)}


def problems(with_init: bool = True) -> tuple[bl.BilevelProblem, bl.BilevelProblem]:
    start = init if with_init else None
    hooked = bl.BilevelProblem(inner=inner, outer=outer, init=start, features=features)
    folded = bl.BilevelProblem(inner=lambda x, y, b: inner(x, y, features(x, b)), outer=outer, init=start)
    return hooked, folded


def data(seed: int = 0, tasks: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    lead = () if tasks is None else (tasks,)
    x = {"A": torch.randn(P, H, generator=gen, dtype=D), "c": 0.3 * torch.randn(H, generator=gen, dtype=D),
         "w0": 0.5 * torch.randn(H, generator=gen, dtype=D)}
    support = (torch.randn(*lead, N, P, generator=gen, dtype=D), torch.randn(*lead, N, generator=gen, dtype=D))
    query = (torch.randn(*lead, 8, P, generator=gen, dtype=D), torch.randn(*lead, 8, generator=gen, dtype=D))
    return x, support, query


GD = bl.GradientDescent(lr=0.5, steps=12)
ESTIMATORS = {
    "ITD": bl.ITD(),
    "ITD-truncate": bl.ITD(truncate=4),
    "ITD-checkpoint": bl.ITD(checkpoint_every=5),
    "FirstOrder": bl.FirstOrder(),
    "AID-CG": bl.AID(linear_solver=bl.CG(max_steps=10, rtol=1e-12)),
    "AID-CG-forward": bl.AID(linear_solver=bl.CG(max_steps=10, rtol=1e-12), hvp="forward"),
    "AID-Neumann": bl.AID(linear_solver=bl.Neumann(steps=15, alpha=0.5)),
    "IMAML": bl.IMAML(lam=1.0, linear_solver=bl.CG(max_steps=10, rtol=1e-12)),
    "ESJ": bl.ESJ(directions=5, smoothing=1e-4, seed=3),
    "Reptile": bl.Reptile(),
}


def assert_same(a, b, rtol=1e-10, atol=1e-12):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_features_form_equals_folded_form(name) -> None:
    estimator = ESTIMATORS[name]
    hooked, folded = problems()
    x, support, query = data()
    got = bl.hypergrad(hooked, x, inner=GD, estimator=estimator, inner_batch=support, outer_batch=query)
    want = bl.hypergrad(folded, x, inner=GD, estimator=estimator, inner_batch=support, outer_batch=query)
    assert_same(got.value, want.value)
    assert_same(got.params, want.params)
    # not trivially zero: the features' A gets a gradient (Reptile moves only the start w0)
    assert float(got.value["w0" if name == "Reptile" else "A"].abs().max()) > 1e-4
    for key in ("inner_steps", "linear_steps", "num_grad", "num_hvp"):  # the same counts: features are free
        assert torch.equal(torch.as_tensor(got.stats[key]), torch.as_tensor(want.stats[key])), key


@pytest.mark.parametrize("name", ["ITD", "FirstOrder", "AID-CG", "IMAML", "ESJ", "Reptile"])
def test_features_form_equals_folded_form_under_vmap(name) -> None:
    estimator = ESTIMATORS[name]
    hooked, folded = problems()
    x, support, query = data(seed=1, tasks=3)
    kwargs = dict(inner=GD, estimator=estimator, inner_batch=support, outer_batch=query, in_dims=(None, None, 0, 0))
    got = bl.vmap_hypergrad(hooked, x, None, **kwargs)
    want = bl.vmap_hypergrad(folded, x, None, **kwargs)
    assert_same(got.value, want.value)
    assert_same(got.params, want.params)


def test_features_form_equals_folded_form_without_init_and_with_params0() -> None:
    hooked, folded = problems(with_init=False)
    x, support, query = data(seed=2)
    y0 = {"w": torch.zeros(H, dtype=D), "b": torch.zeros((), dtype=D)}
    for estimator in (bl.ITD(), bl.AID(linear_solver=bl.CG(max_steps=10, rtol=1e-12))):
        got = bl.hypergrad(hooked, x, y0, inner=GD, estimator=estimator, inner_batch=support, outer_batch=query)
        want = bl.hypergrad(folded, x, y0, inner=GD, estimator=estimator, inner_batch=support, outer_batch=query)
        assert_same(got.value, want.value)


@pytest.mark.parametrize("estimator", [bl.ITD(), bl.AID(linear_solver=bl.Neumann(steps=8, alpha=0.5)),
                                       bl.AID(linear_solver=bl.CG(max_steps=10, rtol=1e-12))],
                         ids=["ITD", "AID-Neumann", "AID-CG"])
def test_features_apply_to_each_draw_of_a_sampler(estimator) -> None:
    hooked, folded = problems()
    x, _, query = data(seed=3)
    gen = torch.Generator().manual_seed(7)
    pool = (torch.randn(40, P, generator=gen, dtype=D), torch.randn(40, generator=gen, dtype=D))
    sampler = bl.Sampler(lambda step: tuple(t[(3 * step) % 34:(3 * step) % 34 + N] for t in pool))
    kwargs = dict(inner=GD, estimator=estimator, inner_batch=sampler, outer_batch=query)
    assert_same(bl.hypergrad(hooked, x, **kwargs).value, bl.hypergrad(folded, x, **kwargs).value)


def meta_loss(problem, x, support, query, steps) -> torch.Tensor:
    """f(x, y_N(x)) computed directly: the inner loop written out."""
    y = init(x)
    for _ in range(steps):
        grad = torch.func.grad(lambda v: inner(x, v, features(x, support)))(y)
        y = {k: y[k] - 0.5 * grad[k] for k in y}
    return outer(x, y, query)


def test_itd_and_aid_with_features_match_finite_differences() -> None:
    hooked, _ = problems()
    x, support, query = data(seed=4)
    itd = bl.hypergrad(hooked, x, inner=GD, estimator=bl.ITD(), inner_batch=support, outer_batch=query).value
    # AID at the inner optimum is the gradient of f(x, y*(x)); 200 steps reach it to ~1e-14.
    gd_long = bl.GradientDescent(lr=0.5, steps=200)
    aid = bl.hypergrad(hooked, x, {"w": torch.zeros(H, dtype=D), "b": torch.zeros((), dtype=D)}, inner=gd_long,
                       estimator=bl.AID(linear_solver=bl.CG(max_steps=20, rtol=1e-13)),
                       inner_batch=support, outer_batch=query).value
    eps = 1e-6
    for key, index in (("A", (1, 2)), ("c", (3,)), ("A", (0, 0))):
        def shifted(delta, steps):
            z = {k: v.clone() for k, v in x.items()}
            z[key][index] += delta
            return float(meta_loss(hooked, z, support, query, steps))

        fd_itd = (shifted(eps, 12) - shifted(-eps, 12)) / (2 * eps)
        assert float(itd[key][index]) == pytest.approx(fd_itd, rel=1e-6, abs=1e-9)
        fd_aid = (shifted(eps, 400) - shifted(-eps, 400)) / (2 * eps)
        # the AID estimate ignores init: at the optimum y* does not depend on the start
        assert float(aid[key][index]) == pytest.approx(fd_aid, rel=1e-6, abs=1e-9)


def test_features_bad_input_errors() -> None:
    with pytest.raises(TypeError, match=r"BilevelProblem\(features=3\): expected None or a callable"):
        bl.BilevelProblem(inner=inner, outer=outer, features=3)
    x, support, query = data()
    wrong = bl.BilevelProblem(inner=inner, outer=outer, init=init, features=lambda x, b: b[0] @ x["A"])
    with pytest.raises(Exception) as info:
        bl.hypergrad(wrong, x, inner=GD, estimator=bl.ITD(), inner_batch=support, outer_batch=query)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "features(hparams, inner_batch)" in notes and "Fix: make features return the batch" in notes
    none = bl.BilevelProblem(inner=inner, outer=outer, init=init, features=lambda x, b: None)
    with pytest.raises(TypeError, match=r"features \S*<lambda>\(hparams, inner_batch\) returned None.*Fix: return it"):
        bl.hypergrad(none, x, inner=GD, estimator=bl.AID(), inner_batch=support, outer_batch=query)
    raising = bl.BilevelProblem(inner=inner, outer=outer, init=init, features=lambda x, b: b[0] @ x["missing"])
    with pytest.raises(KeyError) as info:
        bl.hypergrad(raising, x, inner=GD, estimator=bl.FirstOrder(), inner_batch=support, outer_batch=query)
    assert "raised inside the problem's features" in "\n".join(info.value.__notes__)


def test_folded_and_featured_views() -> None:
    hooked, _ = problems()
    assert hooked.folded().features is None and hooked.featured().features is None
    assert hooked.folded() == hooked.folded()  # equal views: compiled units and caches can reuse them
    plain = bl.BilevelProblem(inner=inner, outer=outer)
    assert plain.folded() is plain and plain.featured() is plain and plain.featurize({}, (1, 2)) == (1, 2)


# -- the meta-learners use the hook: same meta-gradients as the folded problem --------------------

def folded_meta_gradient(learner, theta, tasks, support):
    """The meta-gradient of the learner's public (folded) problem: its g runs the whole forward."""
    problem = learner.problem
    if isinstance(learner, bl.meta.SharedEmbedding):  # the zero head start of _task_problem, no features
        split = learner._task_problem(theta, support)
        problem = bl.BilevelProblem(inner=learner._inner_objective, outer=problem.outer, init=split.init)
    assert problem.features is None
    hg = bl.vmap_hypergrad(problem, theta, None, inner=learner.inner, estimator=learner.estimator,
                           inner_batch=support, outer_batch=(tasks.query_x, tasks.query_y), in_dims=(None, None, 0, 0))
    return {k: v.mean(0) for k, v in hg.value.items()}


def omniglot_tasks(one_hot: bool = False, tasks: int = 3):
    from bilevel.meta.omniglot import EpisodeFamily
    images = torch.rand(12, 20, 28, 28, generator=torch.Generator().manual_seed(0), dtype=D)
    return EpisodeFamily(images, ways=3, shots=1, queries=2, one_hot=one_hot).sample(tasks, seed=1)


@pytest.mark.parametrize("method", ["anil", "esj", "shared-softmax"])
def test_omniglot_learners_use_features_and_keep_their_meta_gradient(method) -> None:
    from bilevel.meta.omniglot import make_learner
    learner, theta = make_learner(method, 3, hidden=3, inner_lr=0.3, inner_steps=3, dtype=D, seed=2)
    tasks = omniglot_tasks()
    support = (tasks.support_x, tasks.support_y)
    assert learner._task_problem(theta, support).features is not None  # the conv body is split off
    got = learner.meta_gradient(theta, tasks).value
    assert_same(got, folded_meta_gradient(learner, theta, tasks, support), rtol=1e-9, atol=1e-11)


def sequential() -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)]
    return torch.nn.Sequential(*layers).double()


@pytest.mark.parametrize("estimator", [bl.ITD(), bl.FirstOrder(), bl.IMAML(lam=1.0, linear_solver=bl.CG(max_steps=8,
                                       rtol=1e-12))], ids=["ITD", "FirstOrder", "IMAML"])
def test_anil_on_a_sequential_splits_at_its_last_module(estimator) -> None:
    net = sequential()
    calls = []
    net[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    anil = bl.meta.ANIL(net, inner=bl.GradientDescent(lr=0.2, steps=5), estimator=estimator)
    theta = anil.init_hparams()
    tasks = bl.datasets.Sinusoid(shots=5, dtype=D).sample(3, seed=7)
    support = (tasks.support_x, tasks.support_y)
    assert anil._task_problem(theta, support).features is not None
    calls.clear()
    got = anil.meta_gradient(theta, tasks).value
    split_calls = len(calls)
    want = folded_meta_gradient(anil, theta, tasks, support)
    assert_same(got, want, rtol=1e-10, atol=1e-12)
    assert split_calls < len(calls) - 5  # the body ran once for the support set, not at each of 5 steps


def test_anil_without_a_split_keeps_the_folded_problem() -> None:
    net = sequential()
    for head in (("2",), ("4.weight",)):  # the head in the middle; half of the last layer
        anil = bl.meta.ANIL(net, head=head)
        assert anil._task_problem(anil.init_hparams(), None).features is None
    fn = bl.meta.ANIL(lambda p, x: torch.tanh(x @ p["w"]) @ p["v"], head=("v",))
    assert fn._task_problem({}, None).features is None


@pytest.mark.parametrize("estimator", [bl.ITD(), bl.AID(linear_solver=bl.CG(max_steps=20, rtol=1e-12)),
                                       bl.ESJ(directions=4, smoothing=1e-4, seed=1)], ids=["ITD", "AID", "ESJ"])
def test_shared_embedding_softmax_head_meta_gradient_unchanged(estimator) -> None:
    torch.manual_seed(0)
    embed = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh()).double()
    for scaled in (False, True):
        learner = bl.meta.SharedEmbedding(embed, head=bl.meta.SoftmaxHead(ways=3, lam=1.0, scaled_step=scaled),
                                          inner=bl.GradientDescent(lr=0.45, steps=20), estimator=estimator)
        gen = torch.Generator().manual_seed(2)
        xs = torch.randn(3, 6, 2, generator=gen, dtype=D)
        labels = torch.arange(3).repeat_interleave(2).expand(3, -1)
        tasks = bl.meta.Tasks(xs, labels, torch.randn(3, 6, 2, generator=gen, dtype=D), labels)
        theta = learner.init_hparams()
        got = learner.meta_gradient(theta, tasks).value
        assert_same(got, folded_meta_gradient(learner, theta, tasks, (tasks.support_x, tasks.support_y)))


def test_softmax_head_scaled_step_is_gradient_descent_with_step_over_L() -> None:
    head = bl.meta.SoftmaxHead(ways=3, lam=0.5, scaled_step=True)
    gen = torch.Generator().manual_seed(3)
    feats, labels = 4 * torch.rand(6, 5, generator=gen, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    smooth = head.smoothness(feats)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=D), "b": torch.randn(3, generator=gen, dtype=D)}

    def objective(p):
        return head.loss(head.predict(p, feats), labels) + head.penalty(p)

    hess = torch.func.hessian(lambda flat: objective({"w": flat[:15].reshape(5, 3), "b": flat[15:]}))(
        torch.cat([params["w"].reshape(-1), params["b"]]))
    assert float(torch.linalg.eigvalsh(hess)[-1]) <= float(smooth) + 1e-12  # L bounds the curvature
    learner = bl.meta.SharedEmbedding(lambda p, x: x, head=head, estimator=bl.AID())
    scaled = torch.func.grad(lambda p: learner._inner_on_features({}, p, (feats, labels)))(params)
    plain = torch.func.grad(objective)(params)
    assert_same(scaled, {k: v / smooth for k, v in plain.items()})


@pytest.mark.parametrize("name,granularity", [("ITD", "solve"), ("AID-CG", "solve"), ("IMAML", "estimator")])
def test_compiled_estimators_support_features(name, granularity) -> None:
    hooked, folded = problems()
    x, support, query = data(seed=5)
    kwargs = dict(inner=GD, inner_batch=support, outer_batch=query)
    compiled = bl.Compiled(ESTIMATORS[name], granularity=granularity, chunk=4, backend="eager")
    got = bl.hypergrad(hooked, x, estimator=compiled, **kwargs)
    want = bl.hypergrad(folded, x, estimator=ESTIMATORS[name], **kwargs)
    assert_same(got.value, want.value, rtol=1e-9, atol=1e-11)
