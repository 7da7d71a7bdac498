"""`python -m service serve --config PATH`: the same as `llm-gateway serve`."""

from service.main import main

if __name__ == "__main__":
    raise SystemExit(main())
