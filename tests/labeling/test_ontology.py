from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from distillery.labeling.ontology import DELIMITER_TOKEN_IDS, Ontology, OntologyError, build_chunks
from distillery.labeling.tiny import bert_uncased_vocab


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(bert_uncased_vocab().parent))


def span_tokens(tokenizer, chunk, row):
    ids = tokenizer(chunk.text)["input_ids"]
    return [ids[t] for t in np.flatnonzero(chunk.positive_map[row])]


def test_300_multiword_classes_fit_in_chunks_and_all_stay_detectable(tokenizer):
    words = ["red", "small", "wooden", "metal", "striped", "old", "folding", "electric", "plastic", "round"]
    things = ["chair", "table", "lamp", "bicycle", "kettle", "ladder", "bucket", "guitar", "drone", "crate",
              "fence", "scooter", "bench", "helmet", "basket", "mirror", "shovel", "trolley", "kayak", "tent",
              "stool", "fan", "clock", "sink", "door", "window", "cart", "barrel", "box", "sign"]
    names = [f"{w} {t}" for t in things for w in words]
    assert len(names) == 300
    onto = Ontology.from_classes(names)
    chunks = build_chunks(onto, tokenizer, max_text_len=256)
    assert len(chunks) > 1
    assert all(c.num_tokens <= 256 for c in chunks)
    seen = [p for c in chunks for p in c.prompt_ids]
    assert sorted(seen) == list(range(300)), "every prompt in exactly one chunk"
    for c in chunks:
        for row, p in enumerate(c.prompt_ids):
            assert span_tokens(tokenizer, c, row) == tokenizer(names[p], add_special_tokens=False)["input_ids"]
            assert np.isclose(c.positive_map[row].sum(), 1.0)


def test_shared_words_mixed_case_and_dots_stay_distinct(tokenizer):
    onto = Ontology.from_classes(["red block", "Orange Block", "st. bernard", "Traffic Light", "light"])
    (chunk,) = build_chunks(onto, tokenizer)
    spans = [tuple(np.flatnonzero(chunk.positive_map[r])) for r in range(5)]
    assert len(set(spans)) == 5
    # shared word "block" is in both spans, but the spans differ
    assert set(spans[0]) & set(spans[1]) == set()
    ids = tokenizer(chunk.text)["input_ids"]
    assert [ids[t] for t in spans[1]] == tokenizer("orange block", add_special_tokens=False)["input_ids"]
    # the dot inside "st. bernard" is a delimiter to the text encoder: excluded from the span
    assert [ids[t] for t in spans[2]] == tokenizer("st bernard", add_special_tokens=False)["input_ids"]
    assert not any(ids[t] in DELIMITER_TOKEN_IDS for s in spans for t in s)
    assert onto.classes == ("red block", "Orange Block", "st. bernard", "Traffic Light", "light")


def test_prompts_indistinguishable_to_the_tokenizer_are_an_error(tokenizer):
    with pytest.raises(OntologyError, match="same tokens"):
        build_chunks(Ontology.from_classes(["Car", "car"]), tokenizer)
    # several prompts of one class may tokenize alike: that is fine
    build_chunks(Ontology.from_mapping({"Car": "car", "car": "car"}), tokenizer)


def test_bad_ontologies(tmp_path, tokenizer):
    with pytest.raises(OntologyError, match="empty"):
        Ontology.from_classes(" , ")
    with pytest.raises(OntologyError, match="twice"):
        Ontology.from_mapping([["a car", "car"], ["a car", "auto"]])
    with pytest.raises(OntologyError, match="delimiters"):
        build_chunks(Ontology.from_classes(["."]), tokenizer)
    with pytest.raises(OntologyError, match="tokens"):
        build_chunks(Ontology.from_classes([" ".join(["word"] * 300)]), tokenizer)
    f = tmp_path / "o.yaml"
    f.write_text("a red car: car\na blue car: car\nperson: person\n")
    o = Ontology.load(f)
    assert o.classes == ("car", "person") and o.prompt_class == (0, 0, 1)
    assert Ontology.from_dict(o.to_dict()) == o
    f.write_text("- [unclosed")
    with pytest.raises(OntologyError, match="invalid YAML"):
        Ontology.load(f)
    with pytest.raises(OntologyError, match="not found"):
        Ontology.load(tmp_path / "missing.yaml")


#: (YAML text, the problem line after "<file>: "): one line per offending prompt or entry.
BAD_ONTOLOGY_FILES = [
    ("car:\n", ["prompt 'car': its class is empty"]),
    ("car: ''\n", ["prompt 'car': its class must be a non-empty string"]),
    ("car: 3\n", ["prompt 'car': its class is not text (YAML reads unquoted numbers, yes/no, on/off as other types): "
                  "put it in quotes"]),
    ("yes: vehicle\n", ["prompt True is not text (YAML reads unquoted numbers, yes/no, on/off as other types): "
                        "put it in quotes"]),
    ("'  ': car\n", ["prompt '  ' must be a non-empty string"]),
    ("~: car\n", ["prompt None is empty"]),
    ("car: vehicle\nbus:\ntruck: [a]\n", ["prompt 'bus': its class is empty",
                                          "prompt 'truck': its class is not text (YAML reads unquoted numbers, "
                                          "yes/no, on/off as other types): put it in quotes"]),
    ("ontology: {car: ' '}\n", ["prompt 'car': its class must be a non-empty string"]),
    ("- car\n- [bus, vehicle, x]\n- 5\n", ["entry 2 (['bus', 'vehicle', 'x']) must be 'name' or [prompt, class]",
                                           "entry 3 (5) must be 'name' or [prompt, class]"]),
    ("{}\n", ["the ontology is empty; give at least one class"]),
    ("[]\n", ["the ontology is empty; give at least one class"]),
    ("car\n", ["expected a mapping 'prompt: class', got str"]),
    ("", ["the ontology file is empty; write one 'prompt: class' per line"]),
]


@pytest.mark.parametrize("text, problems", BAD_ONTOLOGY_FILES, ids=[str(i) for i in range(len(BAD_ONTOLOGY_FILES))])
def test_bad_ontology_files_name_the_file_and_the_prompt(tmp_path, text, problems):
    f = tmp_path / "o.yaml"
    f.write_text(text)
    with pytest.raises(OntologyError) as e:
        Ontology.load(f)
    assert str(e.value).splitlines() == [f"{f}: {p}" for p in problems]


def test_prompts_are_stripped_and_a_repeat_after_stripping_is_an_error():
    o = Ontology.from_mapping({" a red car ": " car", "person": "person "})
    assert o.prompts == ("a red car", "person") and o.classes == ("car", "person")
    with pytest.raises(OntologyError) as e:
        Ontology.from_mapping({"car ": "car", "car": "auto"}, source="x.yaml")
    assert str(e.value) == "x.yaml: prompt 'car' is given twice"
    # the list form: plain names are their own prompt; pairs keep their class
    o = Ontology.from_mapping(["dog", ["a puppy", "dog"], ("cat", "cat")])
    assert o.prompts == ("dog", "a puppy", "cat") and o.prompt_class == (0, 0, 1) and o.classes == ("dog", "cat")
