"""lvopt.nn.sparsify_embeddings: the one call that gives a model row-sparse embedding gradients
(lvopt/nn.py). Swaps untied input embeddings in place, keeping the Parameter objects; leaves
tied ones dense with a warning; refuses what lvopt.nn.Embedding cannot do, swapping nothing."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lvopt
from conftest import needs_native, rel_err


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 8, padding_idx=0)
        self.pos = nn.Embedding(6, 8)
        shared = nn.Embedding(20, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), shared)  # the same module at two places
        self.again = shared
        self.frozen = nn.Embedding(5, 8).requires_grad_(False)
        self.tied_in = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 30, bias=False)
        self.head.weight = self.tied_in.weight

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        x = x + self.again(ids % 20) + self.frozen(ids % 5) + self.tied_in(ids % 30)
        return self.head(self.blocks[0](x))


def _loss(model, ids):
    return model(ids).logsumexp(-1).mean()


def test_plain_tree_swaps_untied_keeps_parameters():
    torch.manual_seed(0)
    m = Tree().eval()
    before = {n: p for n, p in m.named_parameters()}
    opt_params = list(m.parameters())
    with pytest.warns(lvopt.DenseEmbeddingGradWarning, match="'tied_in'"):
        swapped = lvopt.nn.sparsify_embeddings(m)
    assert set(swapped) == {"tok", "pos", "blocks.1", "again"}
    assert swapped["blocks.1"] is swapped["again"] is m.again is m.blocks[1]
    for name in ("tok", "pos", "again"):
        assert type(getattr(m, name)) is lvopt.nn.Embedding
        assert not getattr(m, name).training
    assert type(m.frozen) is nn.Embedding and type(m.tied_in) is nn.Embedding
    assert m.tok.padding_idx == 0 and m.pos.padding_idx is None
    after = {n: p for n, p in m.named_parameters()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert list(m.parameters()) == opt_params
    with pytest.warns(lvopt.DenseEmbeddingGradWarning):
        assert lvopt.nn.sparsify_embeddings(m) == {}  # nothing left to swap


@needs_native
def test_plain_tree_gradients_are_sparse_and_the_step_matches_torch():
    torch.manual_seed(1)
    dense = Tree()
    sparse = copy.deepcopy(dense)
    with pytest.warns(lvopt.DenseEmbeddingGradWarning):
        lvopt.nn.sparsify_embeddings(sparse)
    od = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.1)
    os_ = lvopt.AdamW(sparse.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ids = torch.randint(0, 50, (2, 6))
        for model, opt in ((dense, od), (sparse, os_)):
            opt.zero_grad()
            _loss(model, ids).backward()
        assert sparse.tok.weight.grad.layout == torch.sparse_coo
        assert sparse.tied_in.weight.grad.layout == torch.strided
        od.step()
        os_.step()
    os_.flush()
    for (n, a), b in zip(dense.named_parameters(), sparse.parameters()):
        assert rel_err(b, a) < 1e-5, n


@pytest.mark.parametrize("kind", ["max_norm", "scale_grad_by_freq", "subclass", "hook"])
def test_refuses_what_it_cannot_do_and_swaps_nothing(kind):
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    m = Tree()
    if kind == "max_norm":
        m.pos = nn.Embedding(6, 8, max_norm=1.0)
    elif kind == "scale_grad_by_freq":
        m.pos = nn.Embedding(6, 8, scale_grad_by_freq=True)
    elif kind == "subclass":
        m.pos = Scaled(6, 8)
    else:
        m.pos.register_forward_hook(lambda *a: None)
    with pytest.raises((ValueError, TypeError), match="'pos'.*Nothing was swapped"):
        lvopt.nn.sparsify_embeddings(m)
    assert type(m.tok) is nn.Embedding


def _hf():
    return pytest.importorskip("transformers")


@needs_native
def test_hf_llama_untied_matches_dense_adamw():
    tf = _hf()
    torch.manual_seed(2)
    cfg = tf.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    dense = tf.LlamaForCausalLM(cfg)
    sparse = copy.deepcopy(dense)
    w = sparse.get_input_embeddings().weight
    with warnings.catch_warnings():
        warnings.simplefilter("error", lvopt.DenseEmbeddingGradWarning)
        swapped = lvopt.nn.sparsify_embeddings(sparse)
    assert list(swapped) == ["model.embed_tokens"]
    emb = sparse.get_input_embeddings()
    assert isinstance(emb, lvopt.nn.Embedding) and emb.weight is w and emb.padding_idx == 0
    od = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    os_ = lvopt.AdamW(sparse.parameters(), lr=1e-3)
    for _ in range(3):
        ids = torch.randint(0, 512, (2, 8))
        losses = []
        for model, opt in ((dense, od), (sparse, os_)):
            opt.zero_grad()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            losses.append(float(out.loss))
            opt.step()
        assert w.grad.layout == torch.sparse_coo
        assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0])
    os_.flush()
    assert rel_err(w, dense.get_input_embeddings().weight) < 1e-5


def test_hf_gpt2_tied_stays_dense_with_warning():
    tf = _hf()
    model = tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    )
    wte = model.transformer.wte
    with pytest.warns(lvopt.DenseEmbeddingGradWarning, match="transformer.wte"):
        swapped = lvopt.nn.sparsify_embeddings(model)
    assert list(swapped) == ["transformer.wpe"]
    assert model.transformer.wte is wte and model.lm_head.weight is wte.weight
    assert isinstance(model.transformer.wpe, lvopt.nn.Embedding)
