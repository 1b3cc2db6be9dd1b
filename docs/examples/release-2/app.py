"""Release 2's start-up, reduced to what docs/evolving.rst needs.

``python app.py DATA_FS`` opens the bank's ZODB with its journal, which
catches it up, and prints each account with its movements.
"""
import sys

import ZODB

import bank
from zjournal import JournaledDB


def main(data_fs, journal="journal"):
    with JournaledDB(ZODB.DB(data_fs), journal) as jdb:
        print(jdb.recovery)
        conn = jdb.open()
        for owner, account in bank.accounts(conn.root()).items():
            print(owner, account.balance,
                  [amount for _, amount in account.movements])
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
