"""GLoRA supernet core: layers, search spaces, model surgery, sub-networks and exact merging.

    from supernet import apply_glora, sample_subnet, set_subnet, count_params, extract_subnet, merge_glora
"""

from .atomic import WriteError, atomic_write, atomic_write_text
from .io import (
    AdapterError,
    adapter_metadata,
    adapter_state_dict,
    load_adapter,
    read_metadata,
    read_safetensors,
    save_adapter,
    state_dict_mismatch,
    timm_classifier_outputs,
)
from .conv import GLoraConv2d
from .export import MERGE_TOLERANCE, create_merged_model, load_merged, merged_file_summary, merged_input_spec, write_merged
from .layer import GLoraLayer, GLoraLinear, SupportTensors, check_lora_scaling, choice_cost
from .plans import LoraScaling
from .merge import (MergeError, MergedCopy, add_zero_biases, added_biases, merge_glora, merged_bias_slots, merged_linear,
                    merged_module)
from .model import (
    ParamCount,
    SubnetSampler,
    apply_glora,
    choice_costs,
    classifier_names,
    count_params,
    dora_layers,
    extract_subnet,
    find_targets,
    get_subnet,
    glora_layer,
    glora_layers,
    head_params,
    layer_choices,
    lora_scalings,
    mark_trainable,
    sample_subnet,
    set_dora,
    set_lora_scaling,
    set_submodule,
    set_subnet,
    uniform_subnet,
)
from .space import TENSORS, Choice, LayerChoice, SearchSpace, SpaceError, load_space, parse_choice
from .subnet import Subnet, draw_choices, load_subnet, parse_subnet, sample_config, save_subnet, subnet_to_dict

__all__ = [name for name in dir() if not name.startswith("_")]
