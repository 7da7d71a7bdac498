"""`python -m service serve --config PATH`: the same as `llm-gateway serve`."""

from service.early_signals import hold

hold()  # before the imports below, which take most of a second

from service.main import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
