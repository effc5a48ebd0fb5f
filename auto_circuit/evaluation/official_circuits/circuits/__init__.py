"""Official circuits: the edges that papers found to implement a task, in our graph's names.

Every function has the signature
``(model, token_positions=False, word_idxs=None, seq_start_idx=0) -> set[Edge]``: it
checks that ``model`` has the graph shape the circuit is written for (layers, heads, block
kind; never the model's name) and looks its edges up by name. With
``token_positions=True`` the model needs one edge per position (``seq_len``) and, where the
circuit names tokens, the dataset's ``word_idxs``; a word at prompt index ``i`` lands on
graph position ``i - seq_start_idx``.

=====================================  ============================  ======================
function                               paper                         model graph
=====================================  ============================  ======================
``ioi_true_edges`` (+ ``_mlp_0_only``) Wang et al. 2022              GPT-2 small, sep. QKV
``ioi_head_based_official_edges``      Wang et al. 2022              GPT-2 small
``greaterthan_true_edges``             Hanna et al. 2023             GPT-2 small, sep. QKV
``docstring_true_edges``               Heimersheim & Janiak 2023     attn-only-4l, sep. QKV
``docstring_node_based_official_...``  Heimersheim & Janiak 2023     attn-only-4l
``sports_players_true_edges``          Nanda et al. 2023             pythia-2.8b, one QKV
``tracr_reverse_{true,acdc}_edges``    Miller et al. 2024 / ACDC     tracr reverse (4L x 1H)
``tracr_xproportion_{official,acdc}``  Miller et al. 2024 / ACDC     tracr xproportion (2L)
=====================================  ============================  ======================
"""

from auto_circuit.evaluation.official_circuits.circuits.docstring_official import (
    docstring_node_based_official_edges,
    docstring_true_edges,
)
from auto_circuit.evaluation.official_circuits.circuits.greaterthan_official import (
    greaterthan_true_edges,
)
from auto_circuit.evaluation.official_circuits.circuits.induction_official import (
    induction_true_edges,
)
from auto_circuit.evaluation.official_circuits.circuits.ioi_official import (
    ioi_head_based_official_edges,
    ioi_true_edges,
    ioi_true_edges_mlp_0_only,
)
from auto_circuit.evaluation.official_circuits.circuits.sports_players_official import (
    sports_players_true_edges,
)
from auto_circuit.evaluation.official_circuits.circuits.tracr_reverse_official import (
    tracr_reverse_acdc_edges,
    tracr_reverse_true_edges,
)
from auto_circuit.evaluation.official_circuits.circuits.tracr_xproportion_official import (
    tracr_xproportion_acdc_edges,
    tracr_xproportion_official_edges,
)

__all__ = [
    "induction_true_edges",
    "docstring_node_based_official_edges",
    "docstring_true_edges",
    "greaterthan_true_edges",
    "ioi_head_based_official_edges",
    "ioi_true_edges",
    "ioi_true_edges_mlp_0_only",
    "sports_players_true_edges",
    "tracr_reverse_acdc_edges",
    "tracr_reverse_true_edges",
    "tracr_xproportion_acdc_edges",
    "tracr_xproportion_official_edges",
]
