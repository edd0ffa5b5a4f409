"""Attribution: the exact ExPLAIND sums of a recorded run at the requested granularity
(docs/design.md §7–10).

Owns, in pipeline order: problem preparation and input checks (:mod:`.problem`, with the spec
parsers of :mod:`.granularity` and the :mod:`.planner`), the train side of a step
(:mod:`.train_side`), the per-step contractions in forward and reverse mode (:mod:`.contraction`),
the two credit strategies (:mod:`.credit`), the accumulator that owns the result buffers and axis
squeezing (:mod:`.accumulator`), the split across torch.distributed ranks (:mod:`.distributed`), the short
orchestration :func:`attribute` (:mod:`.engine`) and
the result :class:`Attribution` (:mod:`.result`).

May import: :mod:`explaind_fast.model`, :mod:`explaind_fast.optim`, :mod:`explaind_fast.quadrature`,
:mod:`explaind_fast.ops`. Never imports: recording, store (a trajectory is used only through its
read API), demos, testing.
"""
from .certificate import AttributionWarning, CertificateError
from .distributed import DistributedAttributionError
from .engine import attribute
from .result import Attribution

__all__ = ["attribute", "Attribution", "AttributionWarning", "CertificateError",
           "DistributedAttributionError"]
