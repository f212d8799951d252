from console.views.base import ConsoleView


class OverviewView(ConsoleView):
    section = "overview"

    def get(self, request):
        return self.render("console/overview.html")
