/* A fastpath FunctionCall client for the handler tests: libpq's PQfn, as the large-object API and old
 * drivers use it. Usage: pqfn CONNINFO FUNCTION_OID [TEXT_ARGUMENT]. Prints the result (text) and exits
 * 0, or prints libpq's error message and exits 1. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: pqfn CONNINFO FUNCTION_OID [TEXT_ARGUMENT]\n");
        return 2;
    }
    PGconn *conn = PQconnectdb(argv[1]);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "%s", PQerrorMessage(conn));
        return 1;
    }
    PQArgBlock args[1];
    int nargs = 0;
    if (argc > 3) {
        args[0].len = (int)strlen(argv[3]);
        args[0].isint = 0;
        args[0].u.ptr = (int *)argv[3];
        nargs = 1;
    }
    char out[1024];
    int len = 0;
    PGresult *r = PQfn(conn, (int)strtoul(argv[2], NULL, 10), (int *)out, &len, 0, args, nargs);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        fprintf(stderr, "%s", PQerrorMessage(conn));
        PQclear(r);
        PQfinish(conn);
        return 1;
    }
    printf("%.*s\n", len, out);
    PQclear(r);
    PQfinish(conn);
    return 0;
}
