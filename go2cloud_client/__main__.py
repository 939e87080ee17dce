from go2cloud_client.cli import main

if __name__ == "__main__":
    main()
