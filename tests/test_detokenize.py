"""Detokenisation rules, checked on lines copied from the real release files."""

import re
from pathlib import Path

import pytest

from src.data import sources
from src.data.detokenize import detokenize_dailydialog, detokenize_wikitext

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# (release line, natural text); lines from wiki.train.tokens / wiki.valid.raw of WikiText-2.
WIKITEXT_CASES = [
    (
        " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the "
        "Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role "
        "@-@ playing video game developed by Sega and Media.Vision for the PlayStation Portable . ",
        "Senjō no Valkyria 3: <unk> Chronicles (Japanese: 戦場のヴァルキュリア3, lit. Valkyria of the "
        "Battlefield 3), commonly referred to as Valkyria Chronicles III outside Japan, is a tactical "
        "role-playing video game developed by Sega and Media.Vision for the PlayStation Portable.",
    ),
    (
        " It is estimated that only 1 larva in every 20 @,@ 000 survives to the benthic phase . ",
        "It is estimated that only 1 larva in every 20,000 survives to the benthic phase.",
    ),
    (
        " Originally $ 14 @,@ 000 was allocated for the construction of the arsenal , but proved inadequate . ",
        "Originally $14,000 was allocated for the construction of the arsenal, but proved inadequate.",
    ),
    (
        " weigh 0 @.@ 7 – 2 @.@ 2 kg ( 1 @.@ 5 – 4 @.@ 9 lb ) . ",
        "weigh 0.7 – 2.2 kg (1.5 – 4.9 lb).",
    ),
    (
        ' The larger one is the " crusher " , and has rounded nodules used for crushing prey ; the other is '
        'the " cutter " , which has sharp inner edges , and is used for holding or tearing the prey . ',
        'The larger one is the "crusher", and has rounded nodules used for crushing prey; the other is '
        'the "cutter", which has sharp inner edges, and is used for holding or tearing the prey.',
    ),
    (
        " A large team of writers handled the script . The game 's opening theme was sung by May 'n . ",
        "A large team of writers handled the script. The game's opening theme was sung by May'n.",
    ),
    (
        " You don 't realise when you live away from home how difficult life can be",
        "You don't realise when you live away from home how difficult life can be",
    ),
    (
        " <unk> <unk> as Algernon , Paul O 'Brien as Lane , Charlotte Parry as Cecily .",
        "<unk> <unk> as Algernon, Paul O'Brien as Lane, Charlotte Parry as Cecily.",
    ),
    (
        " At the break , Blue Jackets ' owner John P. <unk> sent out a",
        "At the break, Blue Jackets' owner John P. <unk> sent out a",
    ),
    (" = = Description = = ", "== Description =="),
    (" = = = Film roles = = = ", "=== Film roles ==="),
    (" = Homarus gammarus = ", "= Homarus gammarus ="),
    (" ", ""),
]

# Utterances of DailyDialog's dialogues_train.txt (text between two __eou__).
DAILYDIALOG_CASES = [
    (
        "Say , Jim , how about going for a few beers after dinner ? ",
        "Say, Jim, how about going for a few beers after dinner?",
    ),
    (" Good.Let ' s go now . ", "Good. Let's go now."),
    (
        " I guess you are right.But what shall we do ? I don't feel like sitting at home . ",
        "I guess you are right. But what shall we do? I don't feel like sitting at home.",
    ),
    (
        " I ’ m a defender . It ’ s a lot of fun . You don ’ t have to be able to skate as fast on defense . ",
        "I’m a defender. It’s a lot of fun. You don’t have to be able to skate as fast on defense.",
    ),
    (
        " Let ’ s see . . . you ’ re a Capricorn . It says that you will be feeling stress at work , but you "
        "could see new , exciting developments in your love life . Looks like we ’ ll both have interesting summers ! ",
        "Let’s see... you’re a Capricorn. It says that you will be feeling stress at work, but you "
        "could see new, exciting developments in your love life. Looks like we’ll both have interesting summers!",
    ),
    (
        " Then the axiom - ' You can't teach an old dog new tricks ' doesn't work any longer . ",
        "Then the axiom - 'You can't teach an old dog new tricks' doesn't work any longer.",
    ),
    (
        ' all right . Would you please stand closer to the flower bed ? Good . Smile . Say " cheese " . OK , got you . ',
        'all right. Would you please stand closer to the flower bed? Good. Smile. Say "cheese". OK, got you.',
    ),
    ("Does he know that he has already at his wits ' end ? ", "Does he know that he has already at his wits' end?"),
    (
        " You mean “ if ” they catch the murderer . I ’ m scared stiff about going into the city center at night . ",
        "You mean “if” they catch the murderer. I’m scared stiff about going into the city center at night.",
    ),
]


@pytest.mark.parametrize("release, natural", WIKITEXT_CASES)
def test_wikitext_real_lines(release, natural):
    assert detokenize_wikitext(release) == natural


@pytest.mark.parametrize("release, natural", DAILYDIALOG_CASES)
def test_dailydialog_real_utterances(release, natural):
    assert detokenize_dailydialog(release) == natural


def test_wikitext_keeps_line_structure():
    article = " = Tower Building = \n \n It was built in 1840 . \n \n = = History = = \n The arsenal 's tower . "
    assert detokenize_wikitext(article) == (
        "= Tower Building =\n\nIt was built in 1840.\n\n== History ==\nThe arsenal's tower."
    )


def test_unbalanced_quote_opens_and_stays_attached():
    assert detokenize_wikitext(' He said " hello , and left') == 'He said "hello, and left'


def test_natural_text_is_left_unchanged():
    # Text that is already natural keeps its spacing (idempotent on normal English).
    text = 'He said "Hi, Jim." It cost $5 (or 10%); don\'t worry.'
    assert detokenize_dailydialog(text) == text
    assert detokenize_wikitext(text) == text


def test_currency_needs_a_number_after_it():
    assert detokenize_wikitext(" paid in $ , not £ 5 ") == "paid in $, not £5"


def test_capitalised_clitics_are_lower_case_unless_the_word_is_in_capitals():
    # DailyDialog writes some clitics capitalised ("I ’ Ve"): 768 in its train split, 0 left.
    assert detokenize_dailydialog("I ’ Ve got a few hours , they ’ Ve said .") == "I’ve got a few hours, they’ve said."
    assert detokenize_dailydialog("Well , I ’ M here and you ’ Re late .") == "Well, I’m here and you’re late."
    # After a word in capitals the clitic is kept as written.
    assert detokenize_dailydialog("DON ' T ! It is IBM ’ s office .") == "DON'T! It is IBM’s office."


@pytest.mark.skipif(not (SHARED_DATA / "dailydialog").is_dir(), reason="needs ../shared/data")
def test_no_capitalised_clitic_left_in_dailydialog_train():
    pattern = re.compile(r"\w['’](?:S|T|Re|RE|M|Ve|VE|Ll|LL|D)\b")
    left = []
    for dialogue in sources.iter_dailydialog_file(sources.find_dailydialog_file(SHARED_DATA, "train")):
        for utterance in dialogue:
            text = detokenize_dailydialog(utterance)
            left += [m.group() for m in pattern.finditer(text)
                     if not text[: m.start() + 1].split()[-1].isupper()]  # "DON'T" is right
    assert left == []
