import pytest

from tandem.engine.errors import EngineError
from tandem.engine.stops import IncrementalDetokenizer, StopStringMatcher, TextStream


def _feed(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        released, stopped = matcher.push(piece)
        out.append(released)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_split_over_pieces_stops_before_it():
    out, stopped = _feed(StopStringMatcher(["</end>"]), ["Hel", "lo <", "/e", "nd> more"])
    assert stopped
    assert "".join(out) == "Hello "
    assert not any("<" in piece for piece in out)


def test_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.push("a <") == ("a ", False)
    assert matcher.push("/e") == ("", False)
    assert matcher.push("x b") == ("</ex b", False)
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins_and_text_ends_before_it():
    out, stopped = _feed(StopStringMatcher(["STOP", "ab"]), ["xx a", "bSTOP"])
    assert stopped and "".join(out) == "xx "


def test_stop_at_the_very_start_gives_empty_text():
    out, stopped = _feed(StopStringMatcher(["\n\n"]), ["\n", "\nrest"])
    assert stopped and "".join(out) == ""


def test_held_text_is_flushed_at_the_end():
    out, stopped = _feed(StopStringMatcher(["<|im_end|>"]), ["answer <|im"])
    assert not stopped
    assert out == ["answer ", "<|im"]


def test_overlapping_prefixes_hold_the_longest_candidate():
    matcher = StopStringMatcher(["abc", "bcd"])
    assert matcher.push("xab") == ("x", False)  # "ab" may start "abc"
    assert matcher.push("cd") == ("", True)  # "abc" matched first
    assert matcher.matched == "abc"


@pytest.mark.parametrize("bad", ["", None, 3])
def test_invalid_stop_strings_raise(bad):
    with pytest.raises(EngineError):
        StopStringMatcher(["ok", bad])


def test_multibyte_characters_split_over_byte_tokens_are_never_emitted_half(byte_tokenizer):
    text = "héllo wörld ✓ 日本語 done"
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    # The test is only meaningful if some token holds part of a character.
    assert any(byte_tokenizer.decode([i]) == "\ufffd" for i in ids)
    detok = IncrementalDetokenizer(byte_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_detokenizer_flush_returns_an_unfinished_character_as_replacement(byte_tokenizer):
    ids = byte_tokenizer.encode("a✓", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_tokenizer)
    assert [detok.push(i) for i in ids[:-1]] == ["a", "", ""]  # ✓ is three bytes
    assert detok.flush() == "\ufffd"


def test_prompt_context_keeps_the_leading_space_of_the_first_output_word(metaspace_tokenizer):
    tok = metaspace_tokenizer
    prompt = tok.encode("The capital is", add_special_tokens=False)
    paris = tok.convert_tokens_to_ids("▁Paris")
    assert tok.decode([paris]) == "Paris"  # decoded alone, the space is lost
    detok = IncrementalDetokenizer(tok, context_ids=prompt)
    assert detok.push(paris) == " Paris"
    assert detok.push(tok.convert_tokens_to_ids("▁and")) == " and"


def test_prompt_ending_inside_a_character_is_not_used_as_context(byte_tokenizer):
    ids = byte_tokenizer.encode("x✓", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_tokenizer, context_ids=ids[:-1])
    assert detok.push(ids[-1]) + detok.flush() in ("\ufffd", "")  # a lone continuation byte
    assert detok.push(byte_tokenizer.encode("ok", add_special_tokens=False)[0]) == "o"


def test_text_stream_with_a_multibyte_stop_string(byte_tokenizer):
    ids = byte_tokenizer.encode("caf✓é ✓✓ after", add_special_tokens=False)
    stream = TextStream(byte_tokenizer, stop_strings=["✓✓"])
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    assert stream.stopped and stream.matched_stop == "✓✓"
    assert "".join(pieces) == "caf✓é "
    assert all("\ufffd" not in p for p in pieces)
    assert stream.flush() == ""
    with pytest.raises(EngineError):
        stream.push(ids[0])


def test_text_stream_flush_finds_a_stop_completed_only_at_the_end(byte_tokenizer):
    # The last token completes the stop string; the detokenizer released nothing yet.
    ids = byte_tokenizer.encode("ok✓", add_special_tokens=False)
    stream = TextStream(byte_tokenizer, stop_strings=["k✓"])
    pieces = [stream.push(i) for i in ids[:-1]]
    assert not stream.stopped
    pieces.append(stream.push(ids[-1]))
    assert stream.stopped and "".join(pieces) == "o"
