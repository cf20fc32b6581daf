"""An echo and command bot (a shipped example): a bot is a user on the SDK, not a plugin.

    python -m pychat.plugins.echo_bot --url http://127.0.0.1:8080 --username echo --password '...'

Add the bot's user to a chat; it answers `/echo <text>` with the text and `/help` with its
commands. The loop below is the whole bot.
"""

from __future__ import annotations

import argparse
import asyncio

from pychat.client import ChatClient


async def run(url: str, username: str, password: str) -> None:
    bot = await ChatClient.login(url, username, password)
    await bot.connect()
    async for event in bot.events():  # reconnects and syncs by itself
        if event["type"] != "msg" or event["sender_id"] == bot.user_id:
            continue  # other events, and its own answers
        command, _, rest = event["content"].partition(" ")
        if command == "/echo" and rest.strip():
            await bot.send(event["chat_id"], rest)
        elif command == "/help":
            await bot.send(event["chat_id"], "/echo <text>: I say it back. /help: this.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--username", required=True)
    p.add_argument("--password", required=True)
    args = p.parse_args()
    asyncio.run(run(args.url, args.username, args.password))


if __name__ == "__main__":
    main()
