import datetime
import decimal
import pickle
import uuid

import persistent
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zjournal import codec
from zjournal.errors import DecodeError
from zjournal.errors import EncodeError

scalars = (st.none() | st.booleans() | st.integers() | st.text()
           | st.binary() | st.floats(allow_nan=False)
           | st.datetimes() | st.decimals(allow_nan=False)
           | st.uuids())
values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(), inner)
                   | st.frozensets(st.integers())),
    max_leaves=20)


class Money:
    """A plain value type an application may register."""

    def __init__(self, cents):
        self.cents = cents

    def __eq__(self, other):
        return isinstance(other, Money) and other.cents == self.cents


class Record(persistent.Persistent):
    pass


class TestRoundTrip:

    @given(values)
    def test_plain_data_round_trips(self, value):
        assert codec.loads(codec.dumps(value)) == value

    def test_common_value_types(self):
        value = {
            "when": datetime.datetime(2026, 1, 2, 3, 4, 5,
                                      tzinfo=datetime.timezone.utc),
            "day": datetime.date(2026, 1, 2),
            "span": datetime.timedelta(seconds=3),
            "amount": decimal.Decimal("10.05"),
            "id": uuid.UUID(int=7),
            "tags": {"a", "b"},
            "z": 1 + 2j,
        }
        assert codec.loads(codec.dumps(value)) == value


class TestAllowList:

    def test_a_pickle_naming_a_function_is_refused(self):
        class Evil:
            def __reduce__(self):
                import os
                return (os.system, ("echo owned > /dev/null",))

        payload = pickle.dumps(Evil(), 4)
        with pytest.raises(DecodeError) as e:
            codec.loads(payload)
        assert "system" in str(e.value)

    def test_unregistered_class_is_refused_on_encode(self):
        with pytest.raises(EncodeError) as e:
            codec.dumps({"money": Money(5)})
        assert "Money" in str(e.value) and "register_type" in str(e.value)

    def test_registered_value_type_is_allowed(self):
        key = (Money.__module__, Money.__qualname__)
        codec.register_type(Money)
        try:
            assert codec.loads(codec.dumps({"m": Money(5)})) == {
                "m": Money(5)}
        finally:
            del codec._allowed[key]

    def test_persistent_objects_cannot_be_arguments(self):
        with pytest.raises(EncodeError):
            codec.dumps({"record": Record()})

    def test_register_type_takes_a_class(self):
        with pytest.raises(TypeError):
            codec.register_type(Money(1))

    def test_garbage_is_a_decode_error(self):
        with pytest.raises(DecodeError):
            codec.loads(b"\x80\x04not a pickle")

    def test_unpicklable_arguments(self):
        with pytest.raises(EncodeError):
            codec.dumps({"f": lambda: None})


class TestDecodingRoutes:
    """loads() takes one of several routes by the bytes a payload holds;
    honest payloads decode the same on every one of them."""

    CASES = {
        "no special byte": {"account": "alice", "amount": 10},
        "a letter that starts an opcode": {"owner": "bob", "order": 7},
        "PUT's letter and a newline": {"put": "p\n12345678\n", "n": 10},
        "names a class": {"when": datetime.date(2026, 1, 2)},
        "over 1 KiB": {"text": "r" * 2000, "id": uuid.UUID(int=3)},
        "many small tuples": {"pairs": [(i, str(i)) for i in range(700)]},
        "bytes with a 4-byte length": {"blob": b"B" * 300},
    }

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_same_value_as_pickle(self, case):
        value = self.CASES[case]
        payload = codec.dumps(value)
        assert codec.loads(payload) == pickle.loads(payload) == value
        # A second time: a walk over the same start is remembered.
        assert codec.loads(payload) == value

    def test_values_are_of_the_real_classes(self):
        value = {"u": uuid.UUID(int=1), "d": decimal.Decimal("1.5"),
                 "f": __import__("fractions").Fraction(1, 3),
                 "t": datetime.datetime(2026, 1, 1), "s": slice(1, 2),
                 "b": bytearray(b"x"), "r": range(3), "c": 1j}
        decoded = codec.loads(codec.dumps(value))
        assert decoded == value
        assert {k: type(v) for k, v in decoded.items()} == {
            k: type(v) for k, v in value.items()}

    def test_a_remembered_walk_is_not_trusted_for_other_bytes(self):
        # Same leading bytes as an honest payload, then a memo index of
        # 2**27 where the honest one had a string.
        honest = codec.dumps({"owner": "bob"})
        assert codec.loads(honest) == {"owner": "bob"}
        start = honest.index(b"owner") + len(b"owner")
        hostile = (honest[:start] + b"\x94Nr\x00\x00\x00\x08.")
        hostile = (hostile[:3] + (len(hostile) - 11).to_bytes(8, "little")
                   + hostile[11:])
        with pytest.raises(DecodeError):
            codec.loads(hostile)

    def test_checked_values_in_threads(self):
        import threading
        payload = codec.dumps({"ids": [uuid.UUID(int=i) for i in range(50)]})
        errors = []

        def decode():
            try:
                for _ in range(200):
                    assert len(codec.loads(payload)["ids"]) == 50
            except Exception as e:      # pragma: no cover
                errors.append(e)

        threads = [threading.Thread(target=decode) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert getattr(codec._pending, "made", None) is None
