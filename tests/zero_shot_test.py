"""Zero-shot evaluation sets: each detokenizer on known pairs, and the two packing protocols."""

import numpy as np
import pytest

from md4_jax.data import zero_shot


@pytest.mark.parametrize("raw,want", [
    (" = = Early life = = \n", " == Early life ==\n"),  # WikiText lines end in " \n".
    ("a 1 @,@ 000 @-@ strong army , built in 3 @.@ 5 years . \n",
     "a 1,000-strong army, built in 3.5 years.\n"),
    ("the king 's men ( and women ) said \" no \" ; then : go ! \n",
     "the king's men (and women) said \"no\"; then: go!\n"),
    ("the players ' union", "the players' union"),
    ("it was 15 \N{DEGREE SIGN} C \nnext", "it was 15\N{DEGREE SIGN}C\nnext"),
])
def test_wikitext(raw, want):
  assert zero_shot.wikitext(raw) == want


@pytest.mark.parametrize("raw,want", [
    ("the company 's shares did n't rise", "the company's shares didn't rise"),
    ("a N % gain to $ N million", "a 1 % gain to $1 million"),
    ("N N N items", "N 1 1 items"),  # Only " N " between spaces is a number.
    ("the <unk> and\\/or the investors ' money", "the ? and/or the investors' money"),
])
def test_ptb(raw, want):
  assert zero_shot.ptb(raw) == want


def test_lambada():
  raw = "  \N{LEFT DOUBLE QUOTATION MARK}Hello,\N{RIGHT DOUBLE QUOTATION MARK} she said  "
  assert zero_shot.lambada(raw) == '\n"Hello," she said'


@pytest.mark.parametrize("raw,want", [
    ("see http : / / example.com now", "see http://example.com now"),
    ("it 's a dog , he said : yes ; no ! really ?", "it's a dog, he said: yes; no! really?"),
    ("they paid $ 20 for it .", "they paid $20 for it."),
    ("he said \" go home \" today", "he said \"go home\" today"),
    ("we do n't know", "we don't know"),
])
def test_lm1b(raw, want):
  assert zero_shot.lm1b(raw) == want


def test_every_table_set_has_a_detokenizer():
  assert set(zero_shot.DETOKENIZERS) == {"lambada", "wikitext2", "wikitext103", "ptb", "lm1b"}


EOS = 99


def test_join_protocol_counts_and_eos_placement():
  docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # Stream: 1 2 3 E 4 5 E 6 7 8 9 E (12 tokens).
  blocks = zero_shot.pack(docs, 5, EOS)
  np.testing.assert_array_equal(blocks, [[1, 2, 3, EOS, 4], [5, EOS, 6, 7, 8]])  # 9 E dropped.
  assert blocks.dtype == np.int32
  np.testing.assert_array_equal(zero_shot.pack(docs, 4, EOS),
                                [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, EOS]])


def test_bos_eos_protocol_wraps_every_block():
  docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
  blocks = zero_shot.pack(docs, 5, EOS, protocol="bos_eos", bos=98)
  # Pieces of 3: [1 2 3] [E 4 5] [E 6 7] [8 9 E]; each as BOS piece EOS.
  np.testing.assert_array_equal(blocks, [[98, 1, 2, 3, EOS], [98, EOS, 4, 5, EOS],
                                         [98, EOS, 6, 7, EOS], [98, 8, 9, EOS, EOS]])
  assert zero_shot.pack(docs, 5, EOS, protocol="bos_eos")[0, 0] == EOS  # GPT-2: BOS = EOS.


def test_a_split_too_short_for_one_block_is_an_error():
  with pytest.raises(ValueError, match="ptb/test has 7 tokens.*fewer than one block of 1024"):
    zero_shot.pack([[1, 2], [3, 4, 5]], 1024, EOS, name="ptb/test")
  with pytest.raises(ValueError, match="Unknown packing protocol"):
    zero_shot.pack([[1]], 4, EOS, protocol="wrap")
  with pytest.raises(ValueError, match="no room"):
    zero_shot.pack([[1]], 2, EOS, protocol="bos_eos")
