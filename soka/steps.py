"""One training micro-step: the loss, its chunked cross-entropy, and the step replayed as a CUDA graph;
and WeightGradNorm, the like-for-like gradient norm of --log-weight-grad.

    step = GraphedStep(model, trainable, amp=amp, pad_id=tok.pad_id) if cuda else eager_step(model, amp)
    loss = step(ids, labels, n_tok)          # forward + backward; gradients accumulate in p.grad

The loss is the sum of next-token cross-entropies over the answer tokens, divided by the answer
tokens of the whole accumulation window (n_tok), so micro-batches and processes add up to one mean.
`ce` is the function that scores a chunk of logits: ce_chunk, or torch.compile(ce_chunk) (--compile).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from soka.tasks import IGNORE_INDEX

CE_CHUNK = 2048   # rows of logits alive at once in the loss (0: plain cross-entropy on all logits)


def loss_sum(model, ids, labels, *, chunk=CE_CHUNK, ce=None):
    """Sum of next-token cross-entropies over the answer tokens (float32). chunk 0: plain cross-entropy
    over all logits at once; else LinearCrossEntropy, `ce` (default ce_chunk) scoring each chunk."""
    if not chunk:
        logits = model(ids)                                      # (B, T, vocab) float32
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum",
                               ignore_index=IGNORE_INDEX)
    h = model(ids, hidden=True)[:, :-1].flatten(0, 1)            # (B·(T-1), dim)
    return LinearCrossEntropy.apply(h, model.output_weight(), labels[:, 1:].flatten(), chunk, ce or ce_chunk)


def ce_chunk(logits, y, grad_dtype):
    """Σ CE over the rows of `logits` (c, vocab) whose target y (c,) is not IGNORE_INDEX (float32), and
    its gradient softmax − onehot on those rows, 0 on the others, in `grad_dtype` (None: no gradient).

    The targets' entries p_y − 1 = expm1(x_y − lse) are computed in float32 from the target logits and
    written over the softmax after its cast: subtracting 1 from a bfloat16 p_y near 1 would lose most
    of the difference. Eager, each line is a pass over a (c, vocab) tensor; compiled (train.py
    --compile), the function reads the logits once and writes the gradient once.
    """
    x = logits.float()                                               # (c, vocab)
    valid = (y != IGNORE_INDEX)[:, None]                             # (c, 1)
    y = y.clamp(min=0)[:, None]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)                   # (c, 1)
    x_y = x.gather(1, y)                                             # (c, 1): the targets' logits
    loss = ((lse - x_y) * valid).sum()
    if grad_dtype is None:
        return loss, None
    g = (torch.softmax(x, dim=-1) * valid).to(grad_dtype)
    g.scatter_(1, y, (torch.expm1(x_y - lse) * valid).to(grad_dtype))
    return loss, g


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(h_i Wᵀ, y_i) over rows with y_i ≠ IGNORE_INDEX, `chunk` rows at a time, with the
    gradients computed in the same pass: ∂/∂logits = softmax − onehot, so ∂h = (softmax − onehot) W
    and ∂W = (softmax − onehot)ᵀ h. Only (chunk, vocab) float32 logits exist at any moment, instead
    of (rows, vocab) logits, their log-softmax and its gradient (3 × 0.5 GB at 4,096 tokens and a
    32,000 vocabulary); backward only scales the saved gradients."""

    @staticmethod
    def forward(ctx, h, W, y, chunk, ce):
        want_h, want_W = h.requires_grad, W.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if want_h else None
        gW = torch.zeros_like(W, dtype=torch.float32) if want_W else None
        # ∂loss/∂logits: in float32 where W's gradient needs it, else in h's dtype, or not at all
        g_dtype = torch.float32 if want_W else h.dtype if want_h else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            loss, g = ce(hc @ W.T, y[s:s + chunk], g_dtype)
            total += loss
            if want_h:
                gh[s:s + chunk] = g.to(h.dtype) @ W
            if want_W:
                gW += g.T @ hc.float()
        ctx.save_for_backward(gh, gW)
        ctx.W_dtype = W.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        gh, gW = ctx.saved_tensors
        return (None if gh is None else gh * grad.to(gh.dtype),
                None if gW is None else (gW * grad).to(ctx.W_dtype), None, None, None)


def eager_step(model, amp, ce=None):
    """One micro-batch's forward (under `amp`) and backward, launched op by op: the loss divided by n_tok."""
    def step(ids, labels, n_tok):
        with amp:
            loss = loss_sum(model, ids, labels, ce=ce) / n_tok
        loss.backward()
        return loss
    return step


class GraphedStep:
    """Forward + backward of one micro-batch, replayed as a CUDA graph: one graph per padded length.

    A small model trains at the speed of Python launching kernels, not of the GPU: SmolLM2 with
    SoKA issues tens of thousands of operator calls per forward + backward. A graph replays them all
    in one call. Sequences are padded to a multiple of `multiple` tokens
    (padding is masked, and attention is causal, so the loss is unchanged) so that a few graphs
    cover every length; they share one memory pool. Gradients accumulate into tensors allocated
    before capture, so accumulation and the optimizer see ordinary .grad tensors.
    """

    def __init__(self, model, params, *, amp, pad_id, multiple=64, compiled=False, ce=None):
        self.model, self.params, self.amp, self.pad_id, self.multiple = model, params, amp, pad_id, multiple
        self.compiled = compiled               # torch.compile'd parts compile again for a new length
        self.ce = ce
        self.graphs, self.pool = {}, None
        self.n_tok = torch.ones((), device=params[0].device)

    def __call__(self, ids, labels, n_tok):
        B, T = ids.shape
        T_pad = -(-T // self.multiple) * self.multiple
        ids, labels = F.pad(ids, (0, T_pad - T), value=self.pad_id), F.pad(labels, (0, T_pad - T), value=IGNORE_INDEX)
        if (B, T_pad) not in self.graphs:
            self.graphs[(B, T_pad)] = self._capture(ids, labels)
        graph, s_ids, s_labels, s_loss = self.graphs[(B, T_pad)]
        s_ids.copy_(ids)
        s_labels.copy_(labels)
        self.n_tok.fill_(n_tok)                  # a float or a 0-d tensor; no wait for the GPU
        graph.replay()
        return s_loss

    def _capture(self, ids, labels):
        kept = [p.grad.clone() for p in self.params]           # warm-up must not disturb this window
        s_ids, s_labels = ids.clone(), labels.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Eager passes before capture run what must not happen inside a graph (cuBLAS and autograd
            # set-up, compiling Triton kernels, and under --compile a new shape). Two for the first
            # graph. A later graph (a new length) needs none, as nothing compiles for a new length
            # (kron_fused's kernels do not specialize on it), except under --compile: one then.
            for _ in range(2 if not self.graphs else int(self.compiled)):
                with self.amp:
                    (loss_sum(self.model, s_ids, s_labels, ce=self.ce) / self.n_tok).backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            with self.amp:
                s_loss = loss_sum(self.model, s_ids, s_labels, ce=self.ce) / self.n_tok
            s_loss.backward()
        self.pool = graph.pool()
        for p, g in zip(self.params, kept):
            p.grad.copy_(g)
        # detached: the loss's autograd graph (its AccumulateGrad nodes, made on this capture's stream)
        # must not outlive the capture, or the next one warns of a stream mismatch; replays write
        # into the same storage either way
        return graph, s_ids, s_labels, s_loss.detach()


class WeightGradNorm:
    """‖∂L/∂W‖₂ over the adapted layers' effective weights W (`train.py --log-weight-grad`).

    The gradient norm train.py logs is of each method's own factors, so it depends on the
    parametrisation: SoKA's σ, U, V and LoRA's A, B see different numbers for the same change of W.
    ∂L/∂W is the same quantity for every method, the gradient full fine-tuning would take, so it
    compares methods like for like. For y = x Wᵀ (+ anything), ∂L/∂W = Σ_tokens gᵀ x with g = ∂L/∂y:
    each adapted layer's forward hook keeps its input x and hooks its output, whose gradient g
    arrives in backward. Summed over a step's micro-batches; `pop()` gives the step's global norm
    (all layers, float64) and starts the next. Holds one float32 (d_out, d_in) matrix per layer and
    keeps each layer's input alive until backward (activation checkpointing then saves less)."""

    def __init__(self, layers):
        self.grads = {}
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers]

    def _hook(self, name):
        def forward_hook(module, inputs, out):
            if not (torch.is_grad_enabled() and out.requires_grad):
                return                      # no backward to come (held-out loss, generation)
            x = inputs[0].detach()

            def on_grad(g):
                G = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()   # (d_out, d_in)
                self.grads[name] = self.grads[name] + G if name in self.grads else G
            out.register_hook(on_grad)
        return forward_hook

    def pop(self):
        total = sum((G.double() ** 2).sum() for G in self.grads.values())
        self.grads.clear()
        return float(total) ** 0.5

    def remove(self):
        for h in self.handles:
            h.remove()


def all_reduce_grads(params, loss_total):
    """Data parallel: sum the gradients (the adapters' only: the base is frozen) and the loss over the
    processes, as one flat tensor. Each process's loss was already divided by the whole window's
    answer tokens, so the sums are the window's mean."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    dist.all_reduce(loss_total)
    o = 0
    for p in params:
        p.grad.copy_(flat[o:o + p.numel()].view_as(p))
        o += p.numel()
