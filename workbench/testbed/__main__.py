from workbench.testbed.model import main

if __name__ == "__main__":
    raise SystemExit(main())
