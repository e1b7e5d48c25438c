/*
 * mo_columns: a SQLite virtual table whose rows come from one columnar BLOB.
 *
 * Why: Python's sqlite3 binds every value of every row from a Python object;
 * for the stream's tables that is about 3 us of a 13-column row, several times
 * what SQLite takes to insert it. With this module the writer binds one BLOB
 * per batch (the Arrow columns laid end to end, see meterops/store/_native.py)
 * and runs ``INSERT INTO t SELECT * FROM temp.cols(?)``: the values go from
 * the BLOB to the B-tree in C.
 *
 *   CREATE VIRTUAL TABLE temp.cols13 USING mo_columns(13);  -- columns c0..c12
 *
 * BLOB layout (native byte order, every section padded to 8 bytes):
 *   int64 magic, int64 columns, int64 rows
 *   per column: int64 kind (1 integer, 2 real, 3 text), int64 has_nulls,
 *     [rows bytes: 1 = NULL]                       if has_nulls
 *     integer, real: rows x 8 bytes (a NaN real reads as NULL, as SQLite binds it)
 *     text: (rows + 1) x int32 offsets, int64 length, length bytes of UTF-8
 * Every offset and length is checked against the BLOB before a row is read.
 */
#include <sqlite3ext.h>
SQLITE_EXTENSION_INIT1

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MO_MAGIC 0x4d4f434f4c530001LL
#define MO_MAX_COLUMNS 256

enum { KIND_INTEGER = 1, KIND_REAL = 2, KIND_TEXT = 3 };

typedef struct {
    int kind;
    const unsigned char *nulls;
    const unsigned char *values; /* integer, real: 8-byte values; text: UTF-8 bytes */
    const unsigned char *offsets; /* text: rows + 1 int32 */
} Column;

typedef struct {
    sqlite3_vtab base;
    int columns;
} Table;

typedef struct {
    sqlite3_vtab_cursor base;
    sqlite3_value *blob; /* a private copy, alive as long as the cursor */
    Column *column;
    sqlite3_int64 rows;
    sqlite3_int64 row;
} Cursor;

typedef struct {
    const unsigned char *at;
    sqlite3_int64 left;
} Reader;

static sqlite3_int64 padded(sqlite3_int64 n) { return (n + 7) & ~(sqlite3_int64)7; }

/* The next n bytes (and their padding), or NULL when the BLOB is too short. */
static const unsigned char *take(Reader *r, sqlite3_int64 n) {
    sqlite3_int64 size = padded(n);
    if (n < 0 || size > r->left) return NULL;
    const unsigned char *p = r->at;
    r->at += size;
    r->left -= size;
    return p;
}

static int take_int64(Reader *r, sqlite3_int64 *out) {
    const unsigned char *p = take(r, 8);
    if (!p) return 0;
    memcpy(out, p, 8);
    return 1;
}

static int32_t offset_at(const Column *c, sqlite3_int64 row) {
    int32_t v;
    memcpy(&v, c->offsets + 4 * row, 4);
    return v;
}

static int connect(sqlite3 *db, void *aux, int argc, const char *const *argv,
                   sqlite3_vtab **out, char **err) {
    (void)aux;
    int columns = argc == 4 ? atoi(argv[3]) : 0;
    if (columns < 1 || columns > MO_MAX_COLUMNS) {
        *err = sqlite3_mprintf("mo_columns: give the number of columns, 1 to %d", MO_MAX_COLUMNS);
        return SQLITE_ERROR;
    }
    sqlite3_str *sql = sqlite3_str_new(db);
    sqlite3_str_appendall(sql, "CREATE TABLE x(");
    for (int i = 0; i < columns; i++) sqlite3_str_appendf(sql, "c%d, ", i);
    sqlite3_str_appendall(sql, "data HIDDEN)");
    char *text = sqlite3_str_finish(sql);
    if (!text) return SQLITE_NOMEM;
    int rc = sqlite3_declare_vtab(db, text);
    sqlite3_free(text);
    if (rc != SQLITE_OK) return rc;
    Table *t = sqlite3_malloc(sizeof(Table));
    if (!t) return SQLITE_NOMEM;
    memset(t, 0, sizeof(Table));
    t->columns = columns;
    *out = &t->base;
    return SQLITE_OK;
}

static int disconnect(sqlite3_vtab *vtab) {
    sqlite3_free(vtab);
    return SQLITE_OK;
}

/* The only plan: the BLOB given as the table-valued argument (data = ?). */
static int best_index(sqlite3_vtab *vtab, sqlite3_index_info *info) {
    int data = ((Table *)vtab)->columns;
    for (int i = 0; i < info->nConstraint; i++) {
        const struct sqlite3_index_constraint *c = &info->aConstraint[i];
        if (c->iColumn == data && c->op == SQLITE_INDEX_CONSTRAINT_EQ && c->usable) {
            info->aConstraintUsage[i].argvIndex = 1;
            info->aConstraintUsage[i].omit = 1;
            info->estimatedCost = 1.0;
            info->idxNum = 1;
            return SQLITE_OK;
        }
    }
    return SQLITE_CONSTRAINT;
}

static int open_cursor(sqlite3_vtab *vtab, sqlite3_vtab_cursor **out) {
    (void)vtab;
    Cursor *c = sqlite3_malloc(sizeof(Cursor));
    if (!c) return SQLITE_NOMEM;
    memset(c, 0, sizeof(Cursor));
    *out = &c->base;
    return SQLITE_OK;
}

static void release(Cursor *c) {
    sqlite3_value_free(c->blob);
    sqlite3_free(c->column);
    c->blob = NULL;
    c->column = NULL;
    c->rows = c->row = 0;
}

static int close_cursor(sqlite3_vtab_cursor *cur) {
    release((Cursor *)cur);
    sqlite3_free(cur);
    return SQLITE_OK;
}

static int fail(Cursor *c, const char *why) {
    sqlite3_vtab *vtab = c->base.pVtab;
    sqlite3_free(vtab->zErrMsg);
    vtab->zErrMsg = sqlite3_mprintf("mo_columns: %s", why);
    release(c);
    return SQLITE_ERROR;
}

static int parse_column(Reader *r, Column *col, sqlite3_int64 rows) {
    sqlite3_int64 kind, has_nulls;
    if (!take_int64(r, &kind) || !take_int64(r, &has_nulls)) return 0;
    if (kind < KIND_INTEGER || kind > KIND_TEXT) return 0;
    col->kind = (int)kind;
    col->nulls = NULL;
    if (has_nulls && !(col->nulls = take(r, rows))) return 0;
    if (kind != KIND_TEXT) return (col->values = take(r, rows * 8)) != NULL;
    sqlite3_int64 length;
    if (!(col->offsets = take(r, (rows + 1) * 4)) || !take_int64(r, &length)) return 0;
    if (!(col->values = take(r, length))) return 0;
    int32_t previous = 0;
    for (sqlite3_int64 i = 0; i <= rows; i++) {
        int32_t at = offset_at(col, i);
        if (at < previous || at > length) return 0;
        previous = at;
    }
    return 1;
}

static int filter(sqlite3_vtab_cursor *cur, int idx, const char *idx_str, int argc,
                  sqlite3_value **argv) {
    (void)idx;
    (void)idx_str;
    Cursor *c = (Cursor *)cur;
    int columns = ((Table *)cur->pVtab)->columns;
    release(c);
    if (argc != 1 || sqlite3_value_type(argv[0]) != SQLITE_BLOB)
        return fail(c, "the argument must be a BLOB");
    if (!(c->blob = sqlite3_value_dup(argv[0]))) return SQLITE_NOMEM;
    Reader r = {sqlite3_value_blob(c->blob), sqlite3_value_bytes(c->blob)};
    sqlite3_int64 magic, count, rows;
    if (!take_int64(&r, &magic) || !take_int64(&r, &count) || !take_int64(&r, &rows) ||
        magic != MO_MAGIC || rows < 0 || rows > INT32_MAX)
        return fail(c, "not a column batch");
    if (count != columns) return fail(c, "the batch has another number of columns");
    if (!(c->column = sqlite3_malloc64(sizeof(Column) * (sqlite3_uint64)columns)))
        return SQLITE_NOMEM;
    for (int i = 0; i < columns; i++)
        if (!parse_column(&r, &c->column[i], rows)) return fail(c, "a column is malformed");
    c->rows = rows;
    c->row = 0;
    return SQLITE_OK;
}

static int next(sqlite3_vtab_cursor *cur) {
    ((Cursor *)cur)->row++;
    return SQLITE_OK;
}

static int eof(sqlite3_vtab_cursor *cur) {
    Cursor *c = (Cursor *)cur;
    return c->row >= c->rows;
}

static int column(sqlite3_vtab_cursor *cur, sqlite3_context *ctx, int i) {
    Cursor *c = (Cursor *)cur;
    if (i >= ((Table *)cur->pVtab)->columns) return SQLITE_OK; /* data: NULL */
    const Column *col = &c->column[i];
    sqlite3_int64 row = c->row;
    if (col->nulls && col->nulls[row]) return SQLITE_OK;
    if (col->kind == KIND_INTEGER) {
        sqlite3_int64 v;
        memcpy(&v, col->values + 8 * row, 8);
        sqlite3_result_int64(ctx, v);
    } else if (col->kind == KIND_REAL) {
        double v;
        memcpy(&v, col->values + 8 * row, 8);
        sqlite3_result_double(ctx, v);
    } else {
        int32_t start = offset_at(col, row);
        sqlite3_result_text(ctx, (const char *)col->values + start,
                            offset_at(col, row + 1) - start, SQLITE_STATIC);
    }
    return SQLITE_OK;
}

static int rowid(sqlite3_vtab_cursor *cur, sqlite3_int64 *out) {
    *out = ((Cursor *)cur)->row;
    return SQLITE_OK;
}

static sqlite3_module module = {
    .iVersion = 0,
    .xCreate = connect,
    .xConnect = connect,
    .xBestIndex = best_index,
    .xDisconnect = disconnect,
    .xDestroy = disconnect,
    .xOpen = open_cursor,
    .xClose = close_cursor,
    .xFilter = filter,
    .xNext = next,
    .xEof = eof,
    .xColumn = column,
    .xRowid = rowid,
};

#ifdef _WIN32
__declspec(dllexport)
#endif
int sqlite3_mocolumns_init(sqlite3 *db, char **err, const sqlite3_api_routines *api) {
    (void)err;
    SQLITE_EXTENSION_INIT2(api);
    return sqlite3_create_module(db, "mo_columns", &module, NULL);
}
