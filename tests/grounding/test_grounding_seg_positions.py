"""Which hidden state stands for a <SEG>: the one at t-1, in training and in generation."""

from __future__ import annotations

import torch

from lightningmodules.models.grounding import generation_seg_hidden_states, seg_hidden_states

SEG = 7


def test_teacher_forced_hidden_is_the_one_before_seg() -> None:
    hidden = torch.arange(3 * 6, dtype=torch.float32).reshape(3, 6, 1).expand(3, 6, 4)  # (B, T, D): value = b*6 + t
    input_ids = torch.tensor(
        [
            [1, 2, SEG, 3, SEG, 0],  # two <SEG>: both used, in order
            [1, 2, 3, 4, 5, 6],  # none
            [0, 0, 1, 2, 3, SEG],
        ]
    )  # left padded, <SEG> last
    embeddings, batch_index = seg_hidden_states(hidden, input_ids, SEG)
    assert batch_index.tolist() == [0, 0, 2]
    assert embeddings[:, 0].tolist() == [1.0, 3.0, 2 * 6 + 4.0]  # positions t-1 = 1, 3 and 4
    assert embeddings.shape == (3, 4)


def test_no_seg_and_seg_at_position_zero() -> None:
    hidden = torch.randn(2, 4, 3)
    embeddings, batch_index = seg_hidden_states(hidden, torch.tensor([[SEG, 1, 2, 3], [1, 2, 3, 4]]), SEG)
    assert embeddings.shape == (0, 3) and batch_index.numel() == 0  # nothing predicts a first-token <SEG>


def test_generation_hidden_states_match_teacher_forcing() -> None:
    """The hidden state that produced a generated <SEG> equals hidden[t-1] of a forward over the
    prompt + answer, and generate()'s last hidden_states entry is the final-norm output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
    ).eval()
    prompt = torch.randint(3, 40, (2, 6))  # (B, P)
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        output_hidden_states=True,
        return_dict_in_generate=True,
        pad_token_id=2,
    )
    generated = out.sequences[:, prompt.shape[1] :]  # (B, K)
    seg_id = int(generated[0, 2])  # pretend this token is <SEG>
    step_hidden = [layers[-1] for layers in out.hidden_states]  # K x (B, t_k, D)
    from_generation, index_generation = generation_seg_hidden_states(step_hidden, generated, seg_id)

    full = torch.cat([prompt, generated], dim=1)  # (B, P + K)
    with torch.no_grad():
        hidden = model.model(input_ids=full, attention_mask=torch.ones_like(full)).last_hidden_state  # (B, P + K, D)
    start = prompt.shape[1] - 1  # position P-1 produced the first generated token
    from_forward, index_forward = seg_hidden_states(hidden[:, start:], full[:, start:], seg_id)
    assert index_generation.tolist() == index_forward.tolist() and len(index_forward) >= 1
    torch.testing.assert_close(from_generation, from_forward, atol=1e-4, rtol=1e-4)
