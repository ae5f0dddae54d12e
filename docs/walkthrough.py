"""Masked diffusion in one file: build a small ModernBERT, train it on Turkish text with the
NELBO, watch the bound fall, then let the block sampler write.

References: MDLM (arXiv 2406.07524: the loss), LLaDA (2502.09992: the sampler), ModernBERT
(2412.13663: the encoder). The equations behind each step are in docs/math.md, the sampler in
docs/sampler.md; the production loop (accumulation, DDP, resume) in minidiff/training/trainer.py.

    python docs/walkthrough.py                          # about a minute on a laptop CPU
    python docs/walkthrough.py --steps 40 --eval-every 20 --hidden 32   # seconds
    python docs/walkthrough.py --text my_turkish.txt    # your own UTF-8 text instead of the one below
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from minidiff import diffusion, optim  # noqa: E402
from minidiff.errors import UserError, run_cli  # noqa: E402
from minidiff.model import ModelConfig, ModernBertMLM  # noqa: E402
from minidiff.sampler import SamplerConfig  # noqa: E402
from minidiff.speed.sampling import generate  # noqa: E402

# A few kB of plain Turkish, written for this file.
TEXT = """\
Türkiye, Asya ile Avrupa arasında bir köprü gibi uzanan geniş bir ülkedir. Başkenti Ankara'dır.
En kalabalık şehri İstanbul'dur; şehir, Boğaz'ın iki yakasına yayılır ve iki kıtaya dokunur.
Karadeniz kıyısında yağmur boldur, çay bahçeleri yamaçlardan denize doğru iner.
Akdeniz'de yazlar uzun ve sıcaktır, kışlar ılık geçer, portakal ağaçları her yerde görülür.
Doğu Anadolu'nun yaylaları yüksektir; kış orada erken gelir ve kar aylarca yerde kalır.
İç Anadolu'da bozkır uzanır, buğday tarlaları rüzgârda dalgalanır, köyler birbirine uzaktır.
Kapadokya'da peri bacaları vardır; sabahları gökyüzü sıcak hava balonlarıyla dolar.
Ege'nin zeytinlikleri eski kentlerin kalıntılarını çevreler, deniz ise masmavidir.
Sabah olunca annem çayı demler, babam ekmek almaya fırına gider, kardeşim henüz uyur.
Kahvaltıda peynir, zeytin, domates, salatalık, bal ve tereyağı yeriz; sohbet uzun sürer.
Okul yolunda arkadaşlarımla buluşurum, birlikte yürür, dünkü maçı konuşuruz.
Öğretmenimiz bugün bize suyun döngüsünü anlattı: su buharlaşır, bulut olur, yağmur yağar.
Öğleden sonra kütüphaneye gittim ve eski bir tarih kitabı okudum; sayfaları sararmıştı.
Akşam yemeğinde mercimek çorbası, pilav ve fırında sebze vardı; tatlı olarak baklava yedik.
Dedem bahçede domates, biber ve fasulye yetiştirir; her sabah onları sular.
Ninem bize eski masallar anlatır; masallarında devler, cüceler ve konuşan kuşlar olur.
Kış gelince sokaklar karla örtülür, çocuklar kızak kayar, kartopu oynar, kardan adam yapar.
Bahar gelince ağaçlar çiçek açar, kırlangıçlar döner, tarlalarda işler yeniden başlar.
Yaz tatilinde denize gideriz; kumda kaleler yapar, dalgalarla oynar, akşamları balık yeriz.
Sonbaharda yapraklar sararır ve düşer, havalar serinler, okullar yeniden açılır.
Kitap okumak insanın ufkunu genişletir; her kitap başka bir dünyaya açılan bir kapıdır.
Bilim, merak eden ve soru soran insanların emeğiyle ilerler; her cevap yeni bir soru getirir.
Şehrin pazarında sebze ve meyve satılır; satıcılar yüksek sesle mallarını över.
Vapurla karşıya geçerken martılara simit atarız; martılar havada yakalar.
Trenle yolculuk yavaş ama güzeldir; pencereden dağlar, ovalar ve nehirler geçer.
Dostluk, zor günde yanında olmaktır; iyi bir dost, sevinci de üzüntüyü de paylaşır.
Türkçe, sondan eklemeli bir dildir; kelimelerin sonuna ekler gelir ve anlam değişir.
Evlerimiz, evlerimizden, evlerimizdeki gibi kelimeler bu eklerle kurulur.
Yarın sabah erkenden kalkacağız, köye gidip dedemin bahçesinde ona yardım edeceğiz.
Güneş batarken gökyüzü kızıla boyanır, ezan okunur, sokak lambaları birer birer yanar.
"""

RESERVED_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # mmBERT's first five ids
PAD, EOS, BOS, UNK, MASK = range(5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64, help="characters per training window")
    p.add_argument("--hidden", type=int, default=96, help="hidden size (4 heads of hidden/4)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out bounds")
    p.add_argument("--sample-tokens", type=int, default=48, help="characters the sampler writes")
    p.add_argument("--text", type=Path, default=None, help="a UTF-8 text file to train on instead")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def windows(ids: torch.Tensor, count: int, length: int, generator) -> torch.Tensor:
    """`count` random windows of `length` characters, each framed <bos> ... (as mmBERT's text)."""
    starts = torch.randint(0, len(ids) - length, (count,), generator=generator)  # [count]
    body = torch.stack([ids[s: s + length - 1] for s in starts.tolist()])  # [count, length-1]
    return torch.cat([torch.full((count, 1), BOS), body], dim=1)  # [count, length]


@torch.no_grad()
def held_out_bound(model, x0: torch.Tensor) -> float:
    """NELBO per character on fixed held-out windows (same masks each time, so values compare):
    E_t E_xt[ w(t) sum_masked -log p(x0_i | x_t) ] / #tokens >= -log p(x0) / #tokens."""
    model.eval()
    draws = [diffusion.nelbo_loss(model, x0, MASK, normalize="token", stratified=True,
                                  generator=torch.Generator().manual_seed(k))[0] for k in range(4)]
    model.train()
    return torch.stack(draws).mean().item()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.text is not None and not args.text.is_file():
        raise UserError(f"--text {args.text}: no such file; expected a UTF-8 text file")
    text = args.text.read_text(encoding="utf-8") if args.text is not None else TEXT
    if len(text) < 4 * args.seq_len:
        raise UserError(f"the text has {len(text)} characters; expected at least 4 x --seq-len")
    torch.manual_seed(args.seed)

    # 1. A character-level vocabulary after mmBERT's five special tokens.
    chars = sorted(set(text))
    itos = RESERVED_TOKENS + chars
    stoi = {c: i for i, c in enumerate(itos)}
    ids = torch.tensor([stoi[c] for c in text])
    split = int(0.9 * len(ids))
    train_ids, held_ids = ids[:split], ids[split:]

    # 2. A small ModernBERT: alternating local (window 16) and global attention, tied decoder.
    config = ModelConfig(vocab_size=len(itos), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4,
                         max_position_embeddings=args.seq_len, local_attention=16,
                         global_attn_every_n_layers=2, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=BOS, cls_token_id=BOS, sep_token_id=EOS, mask_token_id=MASK)
    model = ModernBertMLM(config).train()
    print(f"model: {model.num_parameters():,} parameters, vocabulary {len(itos)} "
          f"(uniform guess: {math.log(len(itos) - len(RESERVED_TOKENS)):.3f} nats/char)")

    # 3. AdamW (decay on matrices only) with warmup then cosine decay of the learning rate.
    opt = optim.AdamW(optim.param_groups(model, weight_decay=0.01), lr=args.lr, betas=(0.9, 0.98))
    lr_schedule = optim.WarmupCosine(opt, warmup=args.steps // 20, total=args.steps)
    data_gen = torch.Generator().manual_seed(args.seed)
    held_out = windows(held_ids, 16, args.seq_len, torch.Generator().manual_seed(1234))  # fixed

    # 4. The loop. One step: draw t per sequence, mask each token with probability 1 - alpha(t),
    #    predict the masked tokens, weight the cross-entropy by -alpha'(t)/(1 - alpha(t)) = 1/t.
    print(f"step 0: held-out NELBO bound {held_out_bound(model, held_out):.3f} nats/char")
    for step in range(1, args.steps + 1):
        x0 = windows(train_ids, args.batch_size, args.seq_len, data_gen)  # [B, S]
        loss, _ = diffusion.nelbo_loss(model, x0, MASK, normalize="token", generator=data_gen)
        loss.backward()
        optim.clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: train loss {loss.item():.3f}, "
                  f"held-out NELBO bound {held_out_bound(model, held_out):.3f} nats/char")

    # 5. Sampling: [<bos> prompt | masks], unmasked block by block, most confident first.
    model.eval()
    prompt = "Türkiye"
    prompt_ids = [BOS] + [stoi.get(c, UNK) for c in prompt]
    sampler = SamplerConfig(max_new_tokens=args.sample_tokens, steps=args.sample_tokens,
                            block_length=16, repetition_penalty=1.2)
    out = generate(model, [prompt_ids], sampler, mask_id=MASK, eos_id=EOS)
    answer = out.answers()[0]
    written = "".join(itos[i] for i in answer if i >= len(RESERVED_TOKENS))
    print(f"sampled {len(answer)} tokens ({len(written)} characters) in {out.num_forward} model calls:")
    print(prompt + written)


if __name__ == "__main__":
    run_cli(main)
