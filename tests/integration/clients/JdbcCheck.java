import java.math.BigDecimal;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.postgresql.PGStatement;

/**
 * pgjdbc through pgsage: prints one JSON object the pytest test checks.
 *
 * <p>Usage: {@code java -cp postgresql.jar:. JdbcCheck HOST PORT DBNAME TABLE}. TABLE is created
 * by this program (and dropped again at the end).
 *
 * <p>Exercises: connection start-up, a PreparedStatement run 10 times (past prepareThreshold=5:
 * named server statement and binary results), a batch insert of 1000 rows, a fetch-size cursor
 * (autocommit off, setFetchSize(50): a named portal suspended and resumed), an error and
 * DatabaseMetaData.getTables.
 */
public final class JdbcCheck {

    private JdbcCheck() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: JdbcCheck HOST PORT DBNAME TABLE");
            System.exit(2);
        }
        String host = args[0];
        String port = args[1];
        String db = args[2];
        String table = args[3];
        String url = "jdbc:postgresql://" + host + ":" + port + "/" + db
                + "?user=postgres&prepareThreshold=5&ApplicationName=pgsage-jdbc-check";
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection conn = DriverManager.getConnection(url)) {
            out.put("driver_version", conn.getMetaData().getDriverVersion());
            try (Statement st = conn.createStatement();
                    ResultSet rs = st.executeQuery(
                            "select current_database(), current_user, current_setting('application_name')")) {
                rs.next();
                out.put("database", rs.getString(1));
                out.put("user", rs.getString(2));
                out.put("application_name", rs.getString(3));
            }

            // ---- PreparedStatement past prepareThreshold: S_n and binary result columns
            List<Object> prepared = new ArrayList<>();
            List<Object> serverPrepared = new ArrayList<>();
            String psql = "select ?::int4 + 1 as i4, ?::int8 * 2 as i8, ?::float8 / 4 as f8,"
                    + " ?::numeric(12,3) as num, 'row ' || ?::text as txt,"
                    + " date '2024-01-01' + ?::int4 as d, ?::int4 % 2 = 0 as even /* jdbc-ps */";
            try (PreparedStatement ps = conn.prepareStatement(psql)) {
                for (int i = 1; i <= 10; i++) {
                    ps.setInt(1, i);
                    ps.setLong(2, 10_000_000_000L + i);
                    ps.setDouble(3, i * 1.5);
                    ps.setBigDecimal(4, new BigDecimal(i + ".125"));
                    ps.setString(5, "n" + i);
                    ps.setInt(6, i);
                    ps.setInt(7, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        List<Object> row = new ArrayList<>();
                        row.add(rs.getInt(1));
                        row.add(rs.getLong(2));
                        row.add(rs.getDouble(3));
                        row.add(rs.getBigDecimal(4).toPlainString());
                        row.add(rs.getString(5));
                        row.add(rs.getDate(6).toString());
                        row.add(rs.getBoolean(7));
                        prepared.add(row);
                    }
                    serverPrepared.add(ps.unwrap(PGStatement.class).isUseServerPrepare());
                }
            }
            out.put("prepared", prepared);
            out.put("server_prepared", serverPrepared);

            // ---- batch insert of 1000 rows
            try (Statement st = conn.createStatement()) {
                st.execute("drop table if exists " + table);
                st.execute("create table " + table + " (id int primary key, name text not null)");
            }
            int batchTotal = 0;
            int batchCounts = 0;
            try (PreparedStatement ins = conn.prepareStatement(
                    "insert into " + table + " (id, name) values (?, ?)")) {
                for (int i = 1; i <= 1000; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "name-" + i);
                    ins.addBatch();
                }
                int[] counts = ins.executeBatch();
                batchCounts = counts.length;
                for (int c : counts) {
                    batchTotal += c;
                }
            }
            out.put("batch_counts", batchCounts);
            out.put("batch_total", batchTotal);
            try (Statement st = conn.createStatement();
                    ResultSet rs = st.executeQuery("select count(*), sum(id) from " + table)) {
                rs.next();
                out.put("table_count", rs.getLong(1));
                out.put("table_sum", rs.getLong(2));
            }

            // ---- fetch-size cursor: autocommit off, 1000 rows in portions of 50
            conn.setAutoCommit(false);
            long fetched = 0;
            long fetchedSum = 0;
            boolean ordered = true;
            int last = 0;
            try (PreparedStatement ps = conn.prepareStatement(
                    "select id, name from " + table + " where id > ? order by id /* jdbc-fetch */")) {
                ps.setFetchSize(50);
                ps.setInt(1, 0);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        int id = rs.getInt(1);
                        if (id != last + 1 || !rs.getString(2).equals("name-" + id)) {
                            ordered = false;
                        }
                        last = id;
                        fetched++;
                        fetchedSum += id;
                    }
                }
            }
            conn.commit();
            conn.setAutoCommit(true);
            out.put("fetch_rows", fetched);
            out.put("fetch_sum", fetchedSum);
            out.put("fetch_ordered", ordered);

            // ---- an error, then the connection still works
            try (Statement st = conn.createStatement()) {
                st.executeQuery("select 1 / (select count(*) - count(*) from " + table + ")");
                out.put("error_sqlstate", null);
            } catch (SQLException e) {
                out.put("error_sqlstate", e.getSQLState());
            }
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("select 42")) {
                rs.next();
                out.put("after_error", rs.getInt(1));
            }

            // ---- DatabaseMetaData.getTables
            DatabaseMetaData md = conn.getMetaData();
            List<Object> tables = new ArrayList<>();
            try (ResultSet rs = md.getTables(null, "public", table, new String[] {"TABLE"})) {
                while (rs.next()) {
                    tables.add(rs.getString("TABLE_SCHEM") + "." + rs.getString("TABLE_NAME")
                            + ":" + rs.getString("TABLE_TYPE"));
                }
            }
            out.put("tables", tables);
            List<Object> columns = new ArrayList<>();
            try (ResultSet rs = md.getColumns(null, "public", table, "%")) {
                while (rs.next()) {
                    columns.add(rs.getString("COLUMN_NAME") + ":" + rs.getString("TYPE_NAME"));
                }
            }
            out.put("columns", columns);

            try (Statement st = conn.createStatement()) {
                st.execute("drop table " + table);
            }
        }
        System.out.println(toJson(out));
    }

    // ------------------------------------------------------------------ a minimal JSON writer

    private static String toJson(Object value) {
        StringBuilder sb = new StringBuilder();
        write(sb, value);
        return sb.toString();
    }

    @SuppressWarnings("unchecked")
    private static void write(StringBuilder sb, Object value) {
        if (value == null) {
            sb.append("null");
        } else if (value instanceof Map) {
            sb.append('{');
            boolean first = true;
            for (Map.Entry<String, Object> e : ((Map<String, Object>) value).entrySet()) {
                if (!first) {
                    sb.append(',');
                }
                first = false;
                writeString(sb, e.getKey());
                sb.append(':');
                write(sb, e.getValue());
            }
            sb.append('}');
        } else if (value instanceof List) {
            sb.append('[');
            boolean first = true;
            for (Object item : (List<Object>) value) {
                if (!first) {
                    sb.append(',');
                }
                first = false;
                write(sb, item);
            }
            sb.append(']');
        } else if (value instanceof Number || value instanceof Boolean) {
            sb.append(value);
        } else {
            writeString(sb, value.toString());
        }
    }

    private static void writeString(StringBuilder sb, String s) {
        sb.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"':
                    sb.append("\\\"");
                    break;
                case '\\':
                    sb.append("\\\\");
                    break;
                case '\n':
                    sb.append("\\n");
                    break;
                case '\r':
                    sb.append("\\r");
                    break;
                case '\t':
                    sb.append("\\t");
                    break;
                default:
                    if (c < 0x20) {
                        sb.append(String.format("\\u%04x", (int) c));
                    } else {
                        sb.append(c);
                    }
            }
        }
        sb.append('"');
    }
}
