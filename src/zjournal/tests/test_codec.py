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
