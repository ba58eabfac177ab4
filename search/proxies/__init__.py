"""Zero-cost (training-free) proxies behind one interface (issue #7).

>>> from slimline.search.proxies import ProxyInputs, score_architecture, list_proxies
>>> scores = score_architecture(lambda: space.build_model(arch), ["naswot", "synflow"], inputs)

Every proxy scores an untrained model from one fixed mini-batch, higher = better:

* gradient saliency (:mod:`.gradient`): ``grad_norm``, ``snip``, ``grasp``, ``fisher``,
  ``synflow``, ``jacob_cov``;
* activations (:mod:`.activation`): ``naswot``, ``zen`` (CNNs with global pooling),
  ``hidden_cov`` (RNNs);
* transformers (:mod:`.transformer`, the zoo ``vit``): ``attention_confidence``,
  ``synaptic_diversity``, ``synaptic_saliency``;
* teacher-aware (:mod:`.teacher`, DisWOT): ``diswot_relation``, ``diswot_semantic``;
* baselines (:mod:`.baseline`): ``params``, ``flops``.

``get_proxy(name).applicable(model)`` says whether a proxy is defined for a model family;
scoring one that is not raises :class:`ProxyError` naming the proxy and the reason.
"""

from slimline.search.proxies import activation, baseline, gradient, teacher, transformer  # noqa: F401
from slimline.search.proxies.base import (
    Proxy,
    ProxyError,
    ProxyInputs,
    get_proxy,
    list_proxies,
    register_proxy,
    score_architecture,
)

__all__ = [
    "Proxy",
    "ProxyError",
    "ProxyInputs",
    "get_proxy",
    "list_proxies",
    "register_proxy",
    "score_architecture",
]
