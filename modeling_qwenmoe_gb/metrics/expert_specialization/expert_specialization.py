"""Expert specialization as an `evaluate` metric, loaded from this local folder (no network):

    metric = evaluate.load("modeling_qwenmoe_gb/metrics/expert_specialization")
    metric.compute(domains=["code", "math"], counts=[counts_code, counts_math], top_k=2)

`counts` are per-domain (L, E) expert selection counts. Returns I(domain; expert) (mean KL of each domain's expert
distribution from the uniform mixture of domains), per layer and per domain, and each domain's maximum expert
frequency.
"""

import datasets
import evaluate
import torch

from modeling_qwenmoe_gb.analysis import specialization_stats


class ExpertSpecialization(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Qiu et al. 2025, Demons in the Detail: On Implementing Load Balancing Loss for Training "
            "Specialized Mixture-of-Expert Models, arXiv 2501.11873",
            inputs_description="domains: list of str; counts: list of (L, E) nested lists; top_k: int",
            features=datasets.Features(
                {
                    "domains": datasets.Value("string"),
                    "counts": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                }
            ),
        )

    def _compute(self, domains, counts, top_k=1):
        stats = specialization_stats({d: torch.tensor(c) for d, c in zip(domains, counts)}, top_k)
        keys = ("specialization_kl", "kl_per_layer", "kl_per_domain", "max_expert_frequency")
        return {k: stats[k] for k in keys}
