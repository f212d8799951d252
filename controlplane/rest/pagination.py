from rest_framework import pagination
from rest_framework.exceptions import ValidationError


class PageNumberPagination(pagination.PageNumberPagination):
    """DRF's page numbers, held to the schema: `page` and `page_size` are integers in range or a
    400 naming them (DRF would silently use its defaults, or clamp). A page past the end is
    still a 404."""

    page_size_query_param = "page_size"
    max_page_size = 500
    last_page_strings = ()

    def _integer_param(self, request, name: str, maximum: int | None = None) -> int | None:
        raw = request.query_params.get(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or value < 1 or (maximum is not None and value > maximum):
            limit = f"1 to {maximum}" if maximum is not None else "1 or more"
            raise ValidationError({name: [f"Use a whole number from {limit}, not {raw!r}."]})
        return value

    def get_page_size(self, request):
        size = self._integer_param(request, self.page_size_query_param, self.max_page_size)
        return size or self.page_size

    def get_page_number(self, request, paginator):
        return self._integer_param(request, self.page_query_param) or 1

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"]["maximum"] = self.max_page_size
        return parameters
