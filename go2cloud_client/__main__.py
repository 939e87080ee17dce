import sys

if sys.argv[1:2] == ["rsync-tunnel"]:  # started by rsync for every run: skip the CLI's imports
    from go2cloud_client.replication import tunnel

    sys.exit(tunnel.main(sys.argv[2:]))

from go2cloud_client.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
