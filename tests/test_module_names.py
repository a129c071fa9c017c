"""Sites carry module paths as ``model.named_modules()`` names them, so ``exclude`` patterns and
``filter_fn`` work with the names users see (HF decorated forwards, PEFT wrappers, graph breaks)."""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import sparsedrop_compile as sd
from sparsedrop_compile import report as _report
from sparsedrop_compile.harness import train_step
from sparsedrop_compile.passes._names import tidy_source

OPTS = {"block_size": 8, "attention_block": (16, 16)}  # enough blocks at these sizes (max_drop_all)


@pytest.mark.parametrize(
    "source,path",
    [
        ("L['self'].encoder.block[0].layer[1].dropout", "encoder.block.0.layer.1.dropout"),
        ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),  # HF's decorated forwards
        ("L['self'].__dict__['_modules']['base_model'].__dict__['_modules']['model'].transformer.h[0].attn",
         "base_model.model.transformer.h.0.attn"),  # PEFT's __getattr__
        ("L['self']._modules['a']._modules['0']", "a.0"),
        ("G['model'].blocks['attn']", "blocks.attn"),
        ("L['self']", ""),
    ],
)
def test_dynamo_sources_become_dotted_paths(source, path):
    assert tidy_source(source) == path


def _llama(attn):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, attention_dropout=0.1, attn_implementation=attn)
    return tf.LlamaForCausalLM(cfg).train()


@pytest.mark.parametrize("attn,kind", [("eager", "matmul"), ("sdpa", "attention")])
def test_llama_sites_use_named_modules_names_and_exclude_works(attn, kind):
    model = _llama(attn)
    ids = torch.randint(0, 64, (2, 32))
    names = dict(model.named_modules())
    report = sd.explain(model, input_ids=ids, options=OPTS)
    sites = [s for s in report.sites if s.kind == kind]
    assert [s.module_path for s in sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s.module_path in names and s.rewritten for s in sites), [(s.module_path, s.reason) for s in sites]

    report = sd.explain(model, input_ids=ids, options={**OPTS, "exclude": ["model.layers.0.*"]})
    sites = [s for s in report.sites if s.kind == kind]
    assert [s.rewritten for s in sites] == [False, True]
    assert sites[0].reason == "excluded by option exclude='model.layers.0.*'"
    seen = []
    sd.explain(model, input_ids=ids, options={**OPTS, "filter_fn": lambda s: seen.append(s.module_path) or True})
    assert seen and all(p in names for p in seen), seen


def _lora_gpt2():
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=128, n_inner=256, n_layer=1, n_head=2, n_positions=64,
                                            bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["c_attn"], fan_in_fan_out=True)).train()


LORA_DROPOUT = "base_model.model.transformer.h.0.attn.c_attn.lora_dropout.default"
LORA_A = "base_model.model.transformer.h.0.attn.c_attn.lora_A.default"


def test_peft_lora_dropout_is_rewritten_and_named_as_in_named_modules():
    model = _lora_gpt2()
    names = dict(model.named_modules())
    assert LORA_DROPOUT in names and LORA_A in names
    ids = torch.randint(0, 64, (2, 16))
    report = sd.explain(model, input_ids=ids, options=OPTS)
    assert all(s.module_path in names for s in report.sites), [s.module_path for s in report.sites]
    (lora,) = [s for s in report.sites if s.module_path == LORA_DROPOUT]
    assert lora.rewritten and lora.kind == "linear" and lora.consumers == [f"linear {LORA_A}"]

    report = sd.explain(model, input_ids=ids, options={**OPTS, "exclude": ["*.lora_dropout.*"]})
    (lora,) = [s for s in report.sites if s.module_path == LORA_DROPOUT]
    assert not lora.rewritten and "exclude='*.lora_dropout.*'" in lora.reason


def test_peft_lora_model_trains_with_the_rewritten_site():
    model = _lora_gpt2()
    ids = torch.randint(0, 64, (4, 16))
    compiled = torch.compile(model, backend="sparsedrop", options={**OPTS, "inner": "aot_eager"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def loss():
        logits = compiled(input_ids=ids).logits
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

    losses = [train_step(loss, opt).item() for _ in range(6)]
    assert counters["sparsedrop"]["linear_fused"] >= 1
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.lin = nn.Dropout(0.2), nn.Linear(32, 32)

    def forward(self, x):
        torch._dynamo.graph_break()  # this forward becomes its own frame, with itself as L['self']
        return self.lin(self.drop(x))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.inner = nn.Linear(32, 32), nn.ModuleList([_Inner()])

    def forward(self, x):
        return self.inner[0](self.pre(x))


@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_sites_after_a_graph_break_are_named_from_the_compiled_model(how):
    model, x = _Outer().train(), torch.randn(48, 32)
    options = {**OPTS, "inner": "eager", "exclude": ["inner.0.drop"]}
    if how == "torch.compile":
        run = torch.compile(model, backend="sparsedrop", options=options)
    else:
        model.compile(backend="sparsedrop", options=options)
        run = model
    result = _report.ExplainReport()
    with _report.recording(result):
        run(x)
    (site,) = result.sites
    assert site.module_path == "inner.0.drop" and site.consumers == ["linear inner.0.lin"]
    assert not site.rewritten and "exclude='inner.0.drop'" in site.reason


def test_table_keeps_whole_paths_that_differ_only_at_the_end():
    long = "a_rather_long_module_name_that_would_not_fit_a_narrow_column"

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({long: nn.ModuleDict({"drop_a": nn.Dropout(0.1), "drop_b": nn.Dropout(0.1)})})
            self.lin = nn.Linear(32, 32)

        def forward(self, x):
            inner = self.body[long]
            return self.lin(inner["drop_a"](x)) + self.lin(inner["drop_b"](x))

    report = sd.explain(Deep(), torch.randn(48, 32), options=OPTS)
    paths = [s.module_path for s in report.sites]
    assert paths == [f"body.{long}.drop_a", f"body.{long}.drop_b"]
    rows = str(report).splitlines()[3:]
    assert len(rows) == 2 and rows[0] != rows[1]
    assert f"body.{long}.drop_a" in rows[0] and f"body.{long}.drop_b" in rows[1]
