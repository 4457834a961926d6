// Alerts on the gateway: log search alerts on its custom metrics in Application Insights (customMetrics, dimensions in
// customDimensions; queries in ../alerts/*.kql) and metric alerts on the PTU deployments' utilisation.
// Custom metrics reach Log Analytics a few minutes after they are recorded, so every log alert looks at the last 15
// minutes every 5 minutes: a window as short as the evaluation period would miss what arrives late.

param appInsightsId string
param location string
param tags object

@description('429s for one consumer in fifteen minutes, while throttled in at least three of those minutes, that raise the alert.')
@minValue(1)
param throttledRequestsThreshold int = 20

@description('Share of 5xx answers (percent) over fifteen minutes that raises the alert.')
@minValue(1)
@maxValue(100)
param serverErrorPercentThreshold int = 5

@description('Average PTU utilisation (percent) over fifteen minutes that raises the alert.')
@minValue(1)
@maxValue(100)
param ptuUtilizationPercentThreshold int = 90

@description('Resource ids of the Azure OpenAI accounts with provisioned (PTU) deployments.')
param provisionedAccountIds array = []

@description('E-mail address to notify; empty for none.')
param alertEmail string = ''

@description('Resource ids of existing action groups to notify as well.')
param actionGroupIds array = []

var window = 'PT15M'
var frequency = 'PT5M'

resource emailGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-aigw-${uniqueString(appInsightsId)}'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'aigateway'
    enabled: true
    emailReceivers: [
      {
        name: 'operators'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var emailGroupId = resourceId('Microsoft.Insights/actionGroups', 'ag-aigw-${uniqueString(appInsightsId)}')
var notify = concat(empty(alertEmail) ? [] : [emailGroupId], actionGroupIds)

// Every log alert: severity, query, the column measured, the dimensions that split it into one alert each.
var logAlerts = [
  {
    key: 'consumer-throttled'
    displayName: 'AI gateway: consumer throttled (429)'
    description: 'A consumer kept receiving 429 (its tokens-per-minute limit, or every backend busy) through a fifteen-minute window. One alert per consumer (Subscription ID).'
    severity: 3
    query: loadTextContent('../alerts/consumer-throttled.kql')
    measure: 'Throttled'
    operator: 'GreaterThanOrEqual'
    threshold: throttledRequestsThreshold
    dimensions: [
      'Consumer'
    ]
  }
  {
    key: 'breaker-opened'
    displayName: 'AI gateway: circuit breaker opened'
    description: 'A backend was taken out of rotation (breaker transition to open). One alert per backend and region.'
    severity: 2
    query: loadTextContent('../alerts/breaker-opened.kql')
    measure: 'Trips'
    operator: 'GreaterThan'
    threshold: 0
    dimensions: [
      'Backend'
      'Region'
    ]
  }
  {
    key: 'server-errors'
    displayName: 'AI gateway: 5xx answers'
    description: 'The share of the gateway\'s answers that were 5xx over fifteen minutes (at least 20 answers).'
    severity: 1
    query: loadTextContent('../alerts/server-errors.kql')
    measure: 'ServerErrorPercent'
    operator: 'GreaterThanOrEqual'
    threshold: serverErrorPercentThreshold
    dimensions: []
  }
  {
    key: 'store-fallbacks'
    displayName: 'AI gateway: limiter store fallbacks'
    description: 'The token limiter could not use Table Storage and fell back to per-instance limits (fail mode open) or refused (closed). One alert per reason.'
    severity: 2
    query: loadTextContent('../alerts/store-fallbacks.kql')
    measure: 'Fallbacks'
    operator: 'GreaterThan'
    threshold: 0
    dimensions: [
      'Reason'
    ]
  }
]

resource logAlertRules 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [for alert in logAlerts: {
  name: 'aigw-${alert.key}-${uniqueString(appInsightsId)}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: alert.displayName
    description: alert.description
    severity: alert.severity
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: frequency
    windowSize: window
    criteria: {
      allOf: [
        {
          query: alert.query
          timeAggregation: 'Total'
          metricMeasureColumn: alert.measure
          operator: alert.operator
          threshold: alert.threshold
          dimensions: map(alert.dimensions, dimension => {
            name: dimension
            operator: 'Include'
            values: [
              '*'
            ]
          })
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    // A new Application Insights resource has no custom metrics yet, so validating the query could fail the first
    // deployment; the queries are checked by tests/test_bicep.py instead.
    skipQueryValidation: true
    actions: {
      actionGroups: notify
    }
  }
  dependsOn: [
    emailGroup
  ]
}]

// PTU utilisation from the accounts' own platform metric (one rule per account, per deployment by dimension):
// near 100 % the deployment answers 429 and the gateway spills over to pay-as-you-go.
resource ptuUtilization 'Microsoft.Insights/metricAlerts@2018-03-01' = [for accountId in provisionedAccountIds: {
  name: 'aigw-ptu-utilization-${uniqueString(accountId)}'
  location: 'global'
  tags: tags
  properties: {
    description: 'A provisioned (PTU) deployment of ${last(split(accountId, '/'))} averaged at least ${ptuUtilizationPercentThreshold}% utilisation over fifteen minutes.'
    severity: 2
    enabled: true
    scopes: [
      accountId
    ]
    evaluationFrequency: frequency
    windowSize: window
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'utilization'
          metricNamespace: 'Microsoft.CognitiveServices/accounts'
          metricName: 'AzureOpenAIProvisionedManagedUtilizationV2'
          timeAggregation: 'Average'
          operator: 'GreaterThanOrEqual'
          threshold: ptuUtilizationPercentThreshold
          dimensions: [
            {
              name: 'ModelDeploymentName'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
        }
      ]
    }
    autoMitigate: true
    actions: map(notify, group => {
      actionGroupId: group
    })
  }
}]

output alertRuleIds array = [for (alert, i) in logAlerts: logAlertRules[i].id]
