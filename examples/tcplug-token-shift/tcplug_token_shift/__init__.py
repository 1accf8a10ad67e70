"""A third-party tcplug plugin: token-shift attention.

Before per-frame attention, a fraction of each head's key/value channels is taken from the
previous frame (a temporal shift, as in TSM), so frame ``n`` sees a little of frame
``n - 1`` at no extra attention cost. Causal: frame ``n`` never sees a later frame.
"""

import torch
import torch.nn.functional as F

from tcplug import AttentionVariant, hookimpl

__version__ = "0.1.0"


class TokenShift(AttentionVariant):
    """Per-frame attention whose keys/values carry shifted channels of the previous frame.

    Args:
        fraction: share of head channels taken from the previous frame (0 = per-frame).

    ``q``: ``(B, Tq, H, N, D)``; ``k, v``: ``(B, Tk, H, N, D)`` with ``Tk >= Tq`` (while
    streaming, the buffered frames come first); ``kv_index``: the key frames' absolute
    indices ``(Tk,)``, or None for ``arange(Tk)``. Returns ``(B, Tq, H, N, D)``.
    """

    causal = True

    def __init__(self, fraction: float = 0.25):
        super().__init__()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction

    def _shift(self, x):
        c = int(x.shape[-1] * self.fraction)
        if c == 0 or x.shape[1] < 2:
            return x
        prev = torch.cat([x[:, :1, ..., :c], x[:, :-1, ..., :c]], dim=1)
        return torch.cat([prev, x[..., c:]], dim=-1)

    def forward(self, q, k, v, kv_index=None):
        b, tq, h, n, d = q.shape
        # the queries are the last tq key frames; each sees its own frame's (shifted) keys
        k, v = self._shift(k)[:, -tq:], self._shift(v)[:, -tq:]
        out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))
        return out.view(b, tq, h, n, d)

    def memory(self):
        # streaming: keep the previous frame (its channels are shifted into the next one)
        return 1, False


@hookimpl
def tcplug_register_components(register):
    register(TokenShift, name="token_shift")
