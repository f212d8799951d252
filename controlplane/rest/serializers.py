from rest_framework import serializers


def _json_type_error(field: serializers.Field, value) -> str | None:
    """What is wrong with the JSON type of `value` for `field`, or None. DRF coerces (1 to "1",
    "1" to 1, "true" to True); the API takes the types its schema states and nothing else."""
    if value is None:
        return None  # allow_null decides
    if isinstance(field, serializers.BooleanField):
        return None if isinstance(value, bool) else "Must be true or false."
    if isinstance(field, serializers.IntegerField):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "Must be an integer."
    if isinstance(field, serializers.ListField | serializers.MultipleChoiceField):
        if not isinstance(value, list):
            return "Must be a list."
        child = getattr(field, "child", None)
        errors = [_json_type_error(child, item) for item in value] if child else []
        return next((e for e in errors if e), None)
    if isinstance(
        field,
        serializers.CharField
        | serializers.ChoiceField
        | serializers.DateTimeField
        | serializers.DateField
        | serializers.UUIDField,
    ):
        return None if isinstance(value, str) else "Must be a string."
    return None


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know, so a misspelt field is an error, not silently dropped,
    and values whose JSON type is not the field's, so the schema's types are the API's."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            unknown = sorted(set(data) - writable)
            if unknown:
                raise serializers.ValidationError(
                    {
                        name: [
                            f"Unknown field. Writable fields are: {', '.join(sorted(writable))}."
                        ]
                        for name in unknown
                    }
                )
            wrong = {
                name: [error]
                for name, value in data.items()
                if (error := _json_type_error(self.fields[name], value))
            }
            if wrong:
                raise serializers.ValidationError(wrong)
        return super().to_internal_value(data)


class MoneyField(serializers.DecimalField):
    """An amount in a request body, as a JSON string ("12.50"): a JSON number is a binary float
    in most clients and may arrive with a different value than the one meant."""

    default_error_messages = {
        "not_a_string": 'Send the amount as a string, e.g. "12.50": a JSON number may lose '
        "precision."
    }

    def validate_empty_values(self, data):
        if isinstance(data, str) and not data.strip():
            self.fail("not_a_string")  # DRF would read "" as null
        return super().validate_empty_values(data)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)
