from rest_framework import serializers


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know, so a misspelt field is an error, not silently dropped."""

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
        return super().to_internal_value(data)
